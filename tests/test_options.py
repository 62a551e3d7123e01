import pytest
import torch

import compile_backend
from compile_backend.options import Options


def test_defaults_are_valid():
    assert Options().precision == "fp32"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"precison": "fp16"}, "unknown option 'precison'. Did you mean 'precision'"),
        ({"precision": "fp8x"}, "option 'precision' must be one of fp32, tf32, fp16, bf16"),
        ({"fallback": "ignore"}, "option 'fallback' must be one of eager, error"),
        ({"autotune": "slow"}, "option 'autotune' must be one of off, fast, max"),
        ({"autotune": -3}, "positive number of seconds"),
        ({"autotune": True}, "option 'autotune'"),
        ({"cuda_graphs": "yes"}, "option 'cuda_graphs' must be one of auto, on, off"),
        ({"max_engines": 0}, "option 'max_engines'"),
        ({"validate": "no"}, "option 'validate'"),
        ({"cache_dir": 3}, "option 'cache_dir'"),
    ],
)
def test_bad_options_name_the_option_and_choices(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Options.from_mapping(options)


def test_autotune_seconds_budget():
    assert Options(autotune=30).autotune == 30


def test_typo_through_torch_compile_is_not_ignored():
    m = torch.nn.Linear(3, 3)
    compiled = torch.compile(m, backend="compile_backend", options={"precison": "fp16"})
    with pytest.raises(Exception, match="precison"):
        compiled(torch.randn(2, 3))


def test_typo_through_compile_raises_immediately():
    with pytest.raises(ValueError, match="precison"):
        compile_backend.compile(torch.nn.Linear(3, 3), precison="fp16")


def test_mode_maps_onto_options():
    from compile_backend.backend import resolve_options

    assert resolve_options(None, "max-autotune").autotune == "max"
    assert resolve_options({"autotune": "off"}, "max-autotune").autotune == "off"
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_options(None, "turbo")
