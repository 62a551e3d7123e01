"""The op table of the generator: kind -> (weight, function(gen) -> Val or None).

Each function picks its inputs from the values so far (or makes a fresh input of a fitting
shape), writes a source template and hands it to :meth:`Gen.add`, which runs it once and keeps
it if eager accepts it. Templates: ``{i0}``.. inputs, ``{o}`` the result, ``{p}`` the op's
attribute prefix on the module, ``{D}``/``{float16}``/.. dtypes (fp64 in the reference run).
"""
from __future__ import annotations

import torch

from .graphs import Gen
from .program import Val

REDUCED = (torch.float16, torch.bfloat16)


def _rank(lo: int, hi: int = 9):
    return lambda v: lo <= len(v.shape) <= hi


def _exact_ok(g: Gen, v: Val) -> bool:
    """May a threshold (discontinuous) op read ``v``? Inputs always; computed values in fp32."""
    return v.leaf or v.dtype not in REDUCED


UNARY = (
    "torch.relu({i0})", "F.gelu({i0})", "F.silu({i0})", "torch.tanh({i0})", "torch.sigmoid({i0})",
    "torch.exp({i0})", "{i0} + 0", "{i0} * 1", "{i0} - 0", "0 + {i0}", "{i0} / 1", "{i0} * 2.5",
    "{i0} / 3", "1 - {i0}", "{i0} ** 2", "torch.abs({i0})", "-{i0}", "{i0}.clamp(-0.5, 0.5)",
    "torch.rsqrt({i0}.abs() + 1)", "torch.log1p({i0}.abs())", "torch.sin({i0})",
    "F.leaky_relu({i0}, 0.1)", "F.hardtanh({i0})", "torch.erf({i0})", "F.softplus({i0})",
    "F.elu({i0})", "torch.where({i0} > 0, {i0}, {i0} * 0.1)", "{i0}.clamp(min=0)", "{i0} * 0",
    "torch.sqrt({i0}.abs() + 0.01)", "F.hardswish({i0})", "{i0}.neg().exp() * {i0}",
)


def unary(g: Gen):
    a = g.pick()
    return a and g.add("unary", [a], "{o} = " + g.rng.choice(UNARY))


def _broadcast_partner(g: Gen, a: Val) -> Val:
    """A value whose shape broadcasts against ``a`` without growing it (or a fresh one)."""
    def fits(v: Val) -> bool:
        if len(v.shape) > len(a.shape) or v.name == a.name:
            return False
        return all(s in (1, t) for s, t in zip(reversed(v.shape), reversed(a.shape)))
    v = g.pick(fits) if g.rng.random() < 0.5 else None
    if v is not None:
        return v
    dtype = a.dtype if a.dtype.is_floating_point else g.dtype
    return g.fresh(_broadcast_shape(g, a), dtype)


def _broadcast_shape(g: Gen, a: Val):
    shape = list(a.shape)[g.rng.randint(0, max(0, len(a.shape) - 1)) if g.rng.random() < 0.3 else 0:]
    return [1 if g.rng.random() < 0.35 else s for s in shape]


BINARY = (
    "{i0} + {i1}", "{i0} - {i1}", "{i0} * {i1}", "{i0} / ({i1}.abs() + 1)", "torch.maximum({i0}, {i1})",
    "torch.minimum({i0}, {i1})", "torch.add({i0}, {i1}, alpha=0.5)", "torch.addcmul({i0}, {i1}, {i1}, value=0.5)",
    "torch.lerp({i0}, {i1}.to({i0}.dtype), 0.3)", "{i1} + {i0}", "{i0} * {i1}.sigmoid()",
)


def binary(g: Gen):
    a = g.pick()
    if a is None:
        return None
    b = _broadcast_partner(g, a)
    return g.add("binary", [a, b], "{o} = " + g.rng.choice(BINARY))


def compare(g: Gen):
    a = g.pick(lambda v: _exact_ok(g, v))
    if a is None:
        return None
    t = g.rng.choice(("0.1", "0", "0.25", "-0.3", "0.3", "-0.0", "1.5"))
    op = g.rng.choice((">", "<", ">=", "<=", "==", "!="))
    return g.add("compare", [a], f"{{o}} = {{i0}} {op} {t}")


def where(g: Gen):
    m = g.pick(lambda v: v.dtype == torch.bool, floats=False)
    a = g.pick()
    if a is None:
        return None
    if m is None or g.rng.random() < 0.3:
        m = g.fresh(_broadcast_shape(g, a), torch.bool)
    choice = g.rng.randrange(4)
    if choice == 0:
        return g.add("where", [m, a], "{o} = torch.where({i0}, {i1}, 0.0)")
    if choice == 1:
        return g.add("masked_fill", [m, a], f"{{o}} = {{i1}}.masked_fill({{i0}}, {g.scalar()})")
    if choice == 2:
        return g.add("where", [m, a], "{o} = torch.where({i0}, {i1}, {i1}.exp())")
    b = _broadcast_partner(g, a)
    return g.add("where", [m, a, b], "{o} = torch.where({i0}, {i1}, {i2})")


def mask_use(g: Gen):
    m = g.pick(lambda v: v.dtype == torch.bool and len(v.shape) >= 1, floats=False)
    if m is None:
        return None
    if g.rng.random() < 0.5:
        return g.add("mask_cast", [m], "{o} = {i0}.to({D}) * 2 - 1")
    return g.add("mask_sum", [m], f"{{o}} = {{i0}}.sum({g.dim(m)})", tags=["int"])


def reduction(g: Gen):
    a = g.pick(_rank(1))
    if a is None:
        return None
    r = len(a.shape)
    dims = sorted(g.rng.sample(range(r), g.rng.randint(1, r)))
    d = str(dims[0] - r if g.rng.random() < 0.3 else dims[0]) if len(dims) == 1 else str(tuple(dims))
    k = g.rng.choice(("True", "False"))
    code = g.rng.choice((
        f"{{i0}}.sum({d}, keepdim={k})", f"{{i0}}.mean({d}, keepdim={k})", f"{{i0}}.amax({d}, keepdim={k})",
        f"{{i0}}.amin({d}, keepdim={k})", f"torch.linalg.vector_norm({{i0}}, dim={d}, keepdim={k})",
        f"{{i0}}.norm(dim={d}, keepdim={k})", f"{{i0}}.var({d}, keepdim={k})",
        f"{{i0}}.var({d}, correction=0, keepdim={k})", f"{{i0}}.std({d}, keepdim={k})",
        f"torch.logsumexp({{i0}}, {d}, keepdim={k})", "{i0}.sum()", "{i0}.mean()",
        f"{{i0}}.max({dims[0]}).values", f"{{i0}}.cumsum({dims[0]})", f"{{i0}}.sum({d}, dtype={{float32}})",
    ))
    return g.add("reduction", [a], "{o} = " + code, tags=_zero_ties(code))


#: ops whose zero results have a sign eager does not define: a sum of products that are all
#: zero is +0.0 or -0.0 as the accumulator starts at +0.0 or at the first product (eager's fp32
#: mm of K = 1 gives -0.0 where its bmm gives +0.0); such programs skip the signed-zero check
ACCUMULATING_KINDS = frozenset({"linear", "matmul_param", "matmul", "bmm", "baddbmm", "addmm", "conv1d",
                                "conv2d", "attention", "sdpa"})


def _zero_ties(code: str):
    """A max/min over a slice holding both +0.0 and -0.0 returns whichever zero the reduction
    order meets first: eager does not define that sign either (see ACCUMULATING_KINDS)."""
    return ["zero_ties"] if any(f in code for f in (".amax(", ".amin(", ".max(", "max_pool")) else []


def softmax(g: Gen):
    a = g.pick(_rank(1))
    if a is None:
        return None
    d = g.dim(a)
    code = g.rng.choice((f"F.softmax({{i0}}, dim={d})", f"{{i0}}.log_softmax({d})",
                         f"torch.softmax({{i0}}, {d}, dtype={{float32}})", f"F.log_softmax({{i0}}, dim={d})"))
    return g.add("softmax", [a], "{o} = " + code)


def norm(g: Gen):
    a = g.pick(_rank(2))
    if a is None:
        return None
    kind = g.rng.choice(("layer_norm", "group_norm", "batch_norm", "batch_norm_train", "rms_norm"))
    C = a.shape[1]
    aff = g.rng.random() < 0.7
    if kind in ("layer_norm", "rms_norm"):
        k = g.rng.randint(1, min(2, len(a.shape)))
        shape = tuple(a.shape[-k:])
        if kind == "layer_norm":
            init = f"{{p}} = nn.LayerNorm({shape}, elementwise_affine={aff}, bias={g.rng.random() < 0.7})"
        else:
            init = f"{{p}} = nn.RMSNorm({shape}, elementwise_affine={aff})"
        init += "\nif {p}.weight is not None:\n    nn.init.normal_({p}.weight, 1.0, 0.3)"
        return g.add(kind, [a], "{o} = {p}({i0})", init)
    if kind == "group_norm":
        G = g.rng.choice([d for d in range(1, C + 1) if C % d == 0])
        init = f"{{p}} = nn.GroupNorm({G}, {C}, affine={aff})"
        if aff:
            init += "\nnn.init.normal_({p}.weight, 1.0, 0.3)\nnn.init.normal_({p}.bias, 0.0, 0.3)"
        return g.add(kind, [a], "{o} = {p}({i0})", init)
    training = kind == "batch_norm_train"
    init = (f"{{p}}w = nn.Parameter(torch.randn({C}) * 0.3 + 1)\n{{p}}b = nn.Parameter(torch.randn({C}) * 0.3)\n"
            f"self.register_buffer('{{pn}}rm', torch.randn({C}) * 0.1)\n"
            f"self.register_buffer('{{pn}}rv', torch.rand({C}) + 0.5)")
    code = (f"{{o}} = F.batch_norm({{i0}}, {{p}}rm, {{p}}rv, {{p}}w if {aff} else None, {{p}}b if {aff} else None, "
            f"training={training}, momentum=0.1, eps=1e-5)")
    return g.add(kind, [a], code, init)


def gemm(g: Gen):
    kind = g.rng.choice(("linear", "linear", "matmul_param", "matmul", "bmm", "addmm", "baddbmm"))
    if kind in ("linear", "matmul_param"):
        prev = [g.vals[n] for n in g.gemm_inputs if n in g.vals]
        a = g.rng.choice(prev) if prev and g.rng.random() < 0.5 else g.pick(_rank(1))
        if a is None:
            return None
        K, N = a.shape[-1], g.rng.choice((1, 3, 5, 7, 8, 13, 16))
        if kind == "linear":
            v = g.add(kind, [a], "{o} = {p}({i0})", f"{{p}} = nn.Linear({K}, {N}, bias={g.rng.random() < 0.7})")
        else:
            v = g.add(kind, [a], "{o} = {i0} @ {p}w", f"{{p}}w = nn.Parameter(torch.randn({K}, {N}) / {K ** 0.5:.3f})")
        if v is not None:
            g.gemm_inputs.append(a.name)
        return v
    if kind == "matmul":
        a = g.pick(_rank(2))
        if a is None:
            return None
        b = g.pick(lambda v: len(v.shape) >= 2 and v.shape[-2] == a.shape[-1] and v.dtype == a.dtype)
        if b is not None and g.rng.random() < 0.6:
            return g.add(kind, [a, b], "{o} = {i0} @ {i1}")
        code = g.rng.choice(("{o} = {i0} @ {i0}.transpose(-1, -2)", "{o} = {i0}.mT @ {i0}",
                             "{o} = torch.matmul({i0}, {i0}.mT.sin())"))
        return g.add(kind, [a], code)
    if kind in ("bmm", "baddbmm"):
        a = g.pick(_rank(3, 3)) or g.fresh(g.shape(3))
        B, M, K = a.shape
        N = g.rng.choice((1, 3, 5, 7))
        if kind == "bmm":
            if g.rng.random() < 0.5:
                return g.add(kind, [a], "{o} = torch.bmm({i0}, {i0}.transpose(1, 2))")
            return g.add(kind, [a], "{o} = torch.bmm({i0}, {p}w)", f"{{p}}w = nn.Parameter(torch.randn({B}, {K}, {N}) * 0.4)")
        return g.add(kind, [a], "{o} = torch.baddbmm({p}b, {i0}, {p}w, beta=0.5, alpha=1.5)",
                     f"{{p}}w = nn.Parameter(torch.randn({B}, {K}, {N}) * 0.4)\n{{p}}b = nn.Parameter(torch.randn({M}, {N}))")
    a = g.pick(_rank(2, 2)) or g.fresh(g.shape(2))
    M, K = a.shape
    N = g.rng.choice((1, 3, 5, 7, 13))
    bias = g.rng.choice((f"{N}", f"{M}, {N}", f"1, {N}"))
    return g.add(kind, [a], f"{{o}} = torch.addmm({{p}}b, {{i0}}, {{p}}w, beta={g.rng.choice(('1', '0.5'))}, alpha={g.rng.choice(('1', '2.0'))})",
                 f"{{p}}w = nn.Parameter(torch.randn({K}, {N}) * 0.4)\n{{p}}b = nn.Parameter(torch.randn({bias}))")


def conv(g: Gen):
    nd = g.rng.choice((1, 2))
    a = g.pick(_rank(nd + 2, nd + 2))
    if a is None or g.rng.random() < 0.3:
        N = g.rng.choice((1, 2, 3))
        C = g.rng.choice((1, 2, 3, 4, 6))
        sp = tuple(g.rng.choice((3, 5, 7, 8, 13)) for _ in range(nd)) if nd == 2 else (g.rng.choice((5, 7, 13, 17)),)
        a = g.fresh((N, C) + sp)
    C = a.shape[1]
    groups = g.rng.choice([d for d in range(1, C + 1) if C % d == 0])
    O = groups * g.rng.choice((1, 2, 3))
    k = g.rng.choice((1, 2, 3, 3, 5))
    stride = g.rng.choice((1, 1, 2, 3))
    dil = g.rng.choice((1, 1, 2))
    mode = g.rng.choice(("zeros", "reflect", "replicate", "circular"))
    pad = g.rng.choice(("0", "1", str(k // 2 * dil), "'same'" if stride == 1 else "1", "'valid'"))
    cls = f"nn.Conv{nd}d"
    init = (f"{{p}} = {cls}({C}, {O}, {k}, stride={stride}, padding={pad}, dilation={dil}, groups={groups}, "
            f"bias={g.rng.random() < 0.7}, padding_mode='{mode}')")
    return g.add(f"conv{nd}d", [a], "{o} = {p}({i0})", init, tags=[f"pad_{mode}"])


def pool(g: Gen):
    nd = g.rng.choice((1, 2))
    a = g.pick(_rank(nd + 1, nd + 2))
    if a is None:
        return None
    k = g.rng.choice((2, 3))
    stride = g.rng.choice(("None", "1", "2"))
    pad = g.rng.choice((0, k // 2))
    ceil = g.rng.choice(("True", "False"))
    kind = g.rng.choice(("max", "avg", "adaptive"))
    if kind == "max":
        code = f"F.max_pool{nd}d({{i0}}, {k}, stride={stride}, padding={pad}, ceil_mode={ceil})"
    elif kind == "avg":
        code = (f"F.avg_pool{nd}d({{i0}}, {k}, stride={stride}, padding={pad}, ceil_mode={ceil}, "
                f"count_include_pad={g.rng.choice(('True', 'False'))})")
    else:
        size = g.rng.choice(("1", "2", "3")) if nd == 1 else g.rng.choice(("(1, 1)", "(2, 3)", "3"))
        code = f"F.adaptive_avg_pool{nd}d({{i0}}, {size})"
    tags = (["ties_sensitive"] if kind == "max" and g.train else []) + _zero_ties(code)
    return g.add(f"{kind}_pool{nd}d", [a], "{o} = " + code, tags=tags)


def attention(g: Gen):
    q = g.pick(_rank(3, 4))
    if q is None or g.rng.random() < 0.3:
        q = g.fresh(g.shape(4, 1024) if g.rng.random() < 0.5 else g.shape(3, 1024))
    *batch, L, E = q.shape
    S = g.rng.choice((L, L, 1, 3, 5, 7))
    k = g.pick(lambda v: v.shape == q.shape and v.name != q.name) if S == L else None
    k = k or g.fresh(tuple(batch) + (S, E))
    v = g.fresh(tuple(batch) + (S, g.rng.choice((E, 3, 5)))) if g.rng.random() < 0.5 else k
    mask_kind = g.rng.choice(("none", "causal", "bool", "float", "is_causal", "dead_bool", "dead_float"))
    ins = [q, k, v]
    m = ""
    if mask_kind == "dead_bool":  # fully masked rows: SDPA gives 0, the explicit softmax NaN
        ins.append(g.fresh((L, S), torch.bool, init="dead_mask", layout="contig"))
        mask_kind, m = "bool", "{i3}"
    elif mask_kind == "dead_float":
        ins.append(g.fresh((L, S), init="pad_bias", layout=g.rng.choice(("contig", "expanded"))))
        mask_kind, m = "float", "{i3}"
    elif mask_kind in ("causal", "bool"):
        ins.append(g.fresh((L, S), torch.bool, init="mask" if mask_kind == "bool" else "causal", layout="contig"))
        m = "{i3}"
    elif mask_kind == "float":
        ins.append(g.fresh((L, S)))
        m = "{i3}"
    if g.rng.random() < 0.5:
        extra = ", is_causal=True" if mask_kind == "is_causal" else (f", attn_mask={m}" if m else "")
        scale = g.rng.choice(("", ", scale=0.3"))
        return g.add("sdpa", ins, f"{{o}} = F.scaled_dot_product_attention({{i0}}, {{i1}}, {{i2}}{extra}{scale})")
    code = f"{{o}}s = ({{i0}} @ {{i1}}.transpose(-2, -1)) * {E ** -0.5:.4f}\n"
    if mask_kind in ("causal", "bool"):
        code += "{o}s = {o}s.masked_fill(~{i3}, float('-inf'))\n"
    elif mask_kind == "float":
        code += "{o}s = {o}s + {i3}\n"
    code += "{o} = {o}s.softmax(-1) @ {i2}"
    return g.add("attention", ins, code)


def view(g: Gen):
    a = g.pick(_rank(1), floats=False)
    if a is None:
        return None
    r, s = len(a.shape), a.shape
    opts = [f"{{i0}}.unsqueeze({g.rng.randint(-r - 1, r)})", "{i0}.contiguous()", "{i0}.reshape(-1)",
            f"{{i0}}[{', '.join([':'] * g.rng.randrange(r) + [g.rng.choice(('::2', '1::2', '1:', ':-1', '::3'))])}]",
            f"{{i0}}.narrow({g.dim(a)}, 0, 1)", "{i0}[..., 0]", "{i0}.flatten()"]
    if r >= 2:
        i, j = g.rng.sample(range(r), 2)
        perm = list(range(r))
        g.rng.shuffle(perm)
        opts += [f"{{i0}}.transpose({i}, {j})", f"{{i0}}.permute{tuple(perm)}", "{i0}.mT",
                 f"{{i0}}.flatten({min(i, j)}, {max(i, j)})", "{i0}.reshape(" + f"{s[0]}, -1)"]
    ones = [d for d in range(r) if s[d] == 1]
    if ones:
        d = g.rng.choice(ones)
        big = list(s)
        big[d] = g.rng.choice((3, 5, 7))
        opts += [f"{{i0}}.squeeze({d})", f"{{i0}}.expand{tuple(big)}"]
    d = g.rng.randrange(r + 1)
    big = list(s)
    big.insert(d, g.rng.choice((2, 3, 5)))
    opts.append(f"{{i0}}.unsqueeze({d}).expand{tuple(big)}")
    splittable = [d for d in range(r) if s[d] in (4, 8, 16)]
    if splittable:
        d = g.rng.choice(splittable)
        opts.append(f"{{i0}}.unflatten({d}, (2, {s[d] // 2}))")
    return g.add("view", [a], "{o} = " + g.rng.choice(opts))


def cat_split(g: Gen):
    a = g.pick(_rank(1))
    if a is None:
        return None
    d = g.dim(a)
    choice = g.rng.randrange(6)
    if choice == 0:
        b = g.pick(lambda v: len(v.shape) == len(a.shape) and v.dtype == a.dtype and v.name != a.name and
                   all(x == y for k, (x, y) in enumerate(zip(v.shape, a.shape)) if k != d % len(a.shape)))
        if b is None:
            shape = list(a.shape)
            shape[d] = g.rng.choice((1, 2, 3, 5))
            b = g.fresh(shape, a.dtype)
        return g.add("cat", [a, b], f"{{o}} = torch.cat([{{i0}}, {{i1}}], dim={d})")
    if choice == 1:
        return g.add("cat", [a], f"{{o}} = torch.cat([{{i0}}, {{i0}} * 0.5, {{i0}}.flip({d})], {d})")
    if choice == 2:
        return g.add("stack", [a], f"{{o}} = torch.stack([{{i0}}, {{i0}}.sin()], dim={d})")
    n = a.shape[d]
    if n < 2:
        return None
    if choice == 3:
        sz = g.rng.randint(1, n - 1)
        j = g.rng.randrange(-(-n // sz))
        return g.add("split", [a], f"{{o}} = torch.split({{i0}}, {sz}, dim={d})[{j}]")
    if choice == 4:
        c = g.rng.randint(2, min(n, 4))
        return g.add("chunk", [a], f"{{o}} = {{i0}}.chunk({c}, {d})[{g.rng.randrange(c)}]")
    return g.add("split", [a], f"{{o}}a, {{o}}b = {{i0}}.split([1, {n - 1}], {d})\n{{o}} = {{o}}b * 2 + {{o}}a")


def inplace(g: Gen):
    """In-place ops on intermediates and on views of them (scatter back into the base)."""
    leaf_ok = not g.train and g.rng.random() < 0.2
    a = g.pick(lambda v: (leaf_ok or not v.leaf) and len(v.shape) >= 1)
    if a is None:
        return None
    r, s = len(a.shape), a.shape
    d = g.rng.randrange(r)
    idx = ", ".join([":"] * d + [g.rng.choice(("::2", "1::2", "0", "1:", ":-1"))])
    opts = [f"{{i0}}[..., ::2].mul_(2)", f"{{i0}}[{idx}].add_(1)", f"{{i0}}[{idx}] = {g.scalar()}",
            f"{{i0}}.chunk(2, {d})[0].relu_()", f"torch.split({{i0}}, 1, {d})[-1].zero_()",
            "{i0}.mul_(2)", "{i0}.clamp_(-1, 1)", "{i0}.sigmoid_()", f"{{i0}}.narrow({d}, 0, 1).fill_(1.5)",
            f"{{i0}}.add_({{i0}}.sum({d}, keepdim=True))"]
    if r >= 2:
        opts += ["{i0}.transpose(0, 1)[0].mul_(-1)", "{i0}.diagonal(dim1=-2, dim2=-1).add_(1)",
                 f"{{i0}}[..., 0] = {{i0}}[..., -1] * 3"]
    v = g.add("inplace", [a], g.rng.choice(opts) + "\n{o} = {i0}", tags=["inplace"])
    if v is None and not a.leaf:
        m = g.pick(lambda x: x.dtype == torch.bool and x.shape == a.shape, floats=False)
        if m is not None:
            return g.add("inplace", [a, m], "{i0}[{i1}] = 0.5\n{o} = {i0}", tags=["inplace"])
    return v


def cast(g: Gen):
    a = g.pick()
    if a is None:
        return None
    to = g.rng.choice(("float16", "bfloat16", "float32", "D"))
    if g.rng.random() < 0.5:
        return g.add("cast", [a], f"{{o}} = {{i0}}.to({{{to}}})")
    return g.add("cast", [a], f"{{o}} = ({{i0}}.to({{{to}}}) * 1.5).to({{i0}}.dtype)")


def dropout(g: Gen):
    a = g.pick()
    return a and g.add("dropout", [a], f"{{o}} = F.dropout({{i0}}, p={g.rng.choice((0.2, 0.5))}, training=True)",
                       tags=["dropout"])


def conj(g: Gen):
    a = g.pick(lambda v: v.shape[-1:] and v.shape[-1] % 2 == 0)
    if a is None:
        return None
    shape = a.shape[:-1] + (a.shape[-1] // 2, 2)
    code = f"{{o}}z = torch.view_as_complex({{i0}}.to({{float32}}).reshape{shape})\n"
    if g.rng.random() < 0.5:
        code += "{o} = {o}z.conj() + 0"
    else:
        code += f"{{o}} = torch.view_as_real({{o}}z.conj() * 1).reshape{a.shape}.to({{i0}}.dtype)"
    return g.add("conj", [a], code, tags=["complex"])


OPS = {
    "unary": (14, unary), "binary": (12, binary), "compare": (4, compare), "where": (5, where),
    "mask_use": (2, mask_use), "reduction": (8, reduction), "softmax": (5, softmax), "norm": (6, norm),
    "gemm": (9, gemm), "conv": (6, conv), "pool": (3, pool), "attention": (3, attention), "view": (10, view),
    "cat_split": (5, cat_split), "inplace": (7, inplace), "cast": (3, cast), "dropout": (1, dropout),
    "conj": (1, conj),
}
