"""QuantConfig: validation, layer selection (decide), digest."""
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from compile_backend.kernels import quant_ref
from compile_backend.quant import LayerType, QuantConfig
from compile_backend.quant import config as config_module

ROOT = Path(__file__).resolve().parents[2]


def test_defaults():
    cfg = QuantConfig()
    assert (cfg.precision, cfg.weights, cfg.activations) == ("int8", "per_channel", "static")
    assert cfg.calibrator == "entropy" and cfg.percentile == 99.99 and cfg.min_features == 16
    assert QuantConfig(precision="fp8").calibrator == "max"  # stored resolved, per precision
    assert QuantConfig(precision="fp8", calibrator="entropy").calibrator == "entropy"


def test_precisions_agree_with_the_numerics_reference():
    assert config_module.PRECISIONS == quant_ref.PRECISIONS


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"precison": "fp8"}, "unknown quant option 'precison'. Did you mean 'precision'"),
        ({"precision": "int2"}, "quant option 'precision' must be one of int8, fp8, int4, got 'int2'"),
        ({"weights": "per_row"}, "quant option 'weights' must be one of per_channel, per_tensor"),
        ({"activations": "dyn"}, "quant option 'activations' must be one of static, dynamic"),
        ({"calibrator": "kl"}, "quant option 'calibrator' must be one of max, percentile, entropy, mse"),
        ({"percentile": 0}, "quant option 'percentile' must be a number in"),
        ({"percentile": 100.5}, "quant option 'percentile'"),
        ({"percentile": float("nan")}, "quant option 'percentile'"),
        ({"percentile": True}, "quant option 'percentile'"),
        ({"min_features": 0}, "quant option 'min_features' must be a positive integer"),
        ({"min_features": 2.0}, "quant option 'min_features'"),
        ({"num_bins": 1000}, "quant option 'num_bins' must be a power of two"),
        ({"num_bins": 64}, "quant option 'num_bins'"),
        ({"default_exclusions": "yes"}, "quant option 'default_exclusions' must be True or False"),
        ({"exclude": [3]}, "quant option 'exclude' entries must be module-name globs"),
        ({"include": [""]}, "quant option 'include': a glob must be a non-empty string"),
        ({"include": 5}, "quant option 'include' must be a list"),
        ({"exclude": [{"type": "os.system('x')"}]}, "quant option 'exclude': a module type must be"),
    ],
)
def test_bad_values_name_the_field_and_choices(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        QuantConfig.from_mapping(fields)


def test_lists_become_tuples_and_a_lone_pattern_is_one_entry():
    cfg = QuantConfig(include=["encoder.*", nn.Linear], exclude="lm_head")
    assert cfg.include == ("encoder.*", LayerType("torch.nn.modules.linear.Linear"))
    assert cfg.exclude == ("lm_head",)
    hash(cfg)  # frozen and hashable


def test_as_dict_round_trips_and_equal_configs_have_equal_digests():
    cfg = QuantConfig(precision="fp8", calibrator="mse", exclude=["*.attention.*", nn.Embedding])
    again = QuantConfig.from_mapping(cfg.as_dict())
    assert again == cfg and again.digest() == cfg.digest()
    assert QuantConfig(exclude=("a",)).digest() == QuantConfig(exclude=["a"]).digest()
    assert QuantConfig(precision="fp8").digest() != QuantConfig(precision="int8").digest()
    assert QuantConfig(percentile=99.9).digest() != QuantConfig().digest()


def test_digest_is_stable_across_processes():
    code = ("from compile_backend.quant import QuantConfig; "
            "print(QuantConfig(exclude=['lm_head', {'type': 'torch.nn.modules.sparse.Embedding'}]).digest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert out == QuantConfig(exclude=["lm_head", nn.Embedding]).digest()


def test_replace_keeps_the_rest():
    cfg = QuantConfig(exclude=["x"]).replace(activations="dynamic")
    assert cfg.activations == "dynamic" and cfg.exclude == ("x",)


def test_decide_default_exclusions():
    cfg = QuantConfig()
    assert cfg.decide("encoder.layer.0.attention.self.query", nn.Linear, 384, 384) is None
    assert cfg.decide("emb", nn.Embedding, 64, 64) == "embedding"
    assert cfg.decide("bag", nn.EmbeddingBag, 64, 64) == "embedding"
    assert cfg.decide("bn", nn.BatchNorm2d, 64, 64) == "batch norm"
    assert cfg.decide("lm_head", nn.Linear, 768, 50257) == "output layer (lm_head)"
    assert cfg.decide("model.lm_head", None, 768, 50257) == "output layer (lm_head)"
    assert cfg.decide("fc", nn.Linear, 8, 64) == "K=8 < min_features 16"
    assert cfg.decide("fc", nn.Linear, 64, 10) == "N=10 < min_features 16"
    assert cfg.decide("classifier", nn.Linear, 2048, 1000) is None  # vision heads are quantized
    off = QuantConfig(default_exclusions=False)
    assert off.decide("lm_head", nn.Linear, 768, 50257) is None
    assert off.decide("emb", nn.Embedding, 64, 64) is None


def test_decide_include_and_exclude():
    class MyLinear(nn.Linear):
        pass

    cfg = QuantConfig(include=["encoder.*"], exclude=["encoder.layer.*.attention.*"])
    assert cfg.decide("encoder.layer.0.intermediate.dense", nn.Linear, 64, 64) is None
    assert cfg.decide("encoder.layer.0.attention.self.query", nn.Linear, 64, 64) == \
        "excluded by pattern 'encoder.layer.*.attention.*'"
    assert cfg.decide("pooler.dense", nn.Linear, 64, 64) == "not matched by include (pattern 'encoder.*')"
    by_type = QuantConfig(include=[nn.Linear], exclude=[nn.Conv2d])
    assert by_type.decide("a", MyLinear, 64, 64) is None  # subclasses match
    assert by_type.decide("c", nn.Conv2d, 64, 64) == "excluded by type Conv2d"
    assert by_type.decide("f", None, 64, 64) == "not matched by include (type Linear)"
    # globs match the whole name, case-sensitively
    assert QuantConfig(exclude=["fc"]).decide("block.fc", nn.Linear, 64, 64) is None


def test_importing_quant_imports_no_triton_and_no_cuda():
    code = ("import sys, compile_backend.quant, torch; "
            "print('triton' in sys.modules, torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["False", "False"]
