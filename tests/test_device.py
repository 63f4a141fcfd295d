"""Device and dtype resolution: what every command resolves the same way."""

from __future__ import annotations

import pytest
import torch

from nanogpt.device import cpu_has_native_bf16, device_type, resolve_device, resolve_dtype
from nanogpt.errors import NanoGPTError


def test_auto_dtype_on_cpu_is_bf16_only_with_native_support():
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert resolve_dtype("float32", "cpu") == "float32"
    with pytest.raises(NanoGPTError, match="dtype must be"):
        resolve_dtype("float8", "cpu")


def test_unknown_or_absent_devices_are_clear_errors():
    with pytest.raises(NanoGPTError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(NanoGPTError, match="not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"


def test_device_type_names_the_kind_of_device():
    assert (
        device_type("cuda:1") == "cuda"
        and device_type("cpu") == "cpu"
        and device_type(torch.device("mps")) == "mps"
    )
