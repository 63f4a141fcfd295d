"""int8 inference (nanogpt/quantization.py): each Int8Linear within the rounding error its int8 weights and
inputs allow, a quantised model's logits and loss near float32's, the engine and the plain loop agreeing
on it, --quantize=int8 in sample / eval / serve, and one clear error for what int8 cannot do."""

from __future__ import annotations

import copy
import io
import json
import threading
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch import nn

import nanogpt
from nanogpt.checkpoint import save_checkpoint
from nanogpt.cli import main as cli
from nanogpt.data.tokenizers import CharTokenizer
from nanogpt.errors import NanoGPTError
from nanogpt.generate import Sampling, generate
from nanogpt.model import GPT, GPTConfig
from nanogpt.quantization import MIN_WEIGHTS, Int8Linear, check_quantize, quantize
from nanogpt.sample import SampleConfig, sample

CHARS = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?'\n")))
# n_embd 256: c_attn (768 x 256), c_fc and c_proj (1024 x 256) reach MIN_WEIGHTS, so the default quantises
WIDE = dict(block_size=32, n_layer=2, n_head=4, n_embd=256)


def wide_model(seed: int = 0, **options) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=len(CHARS), **WIDE, **options)).eval()


def copy_of(model: GPT) -> GPT:
    other = GPT(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_within_its_rounding_bound(bias):
    """Per output row i, |int8 - float32| <= sum_j (sw_i/2 |x_j| + |W_ij| sx/2 + sw_i sx/4): weights round
    to sw_i = max_j |W_ij| / 127 (per row), inputs to sx = their range / 255 (127 on a CPU without VNNI),
    each within half a step. The bound is this arithmetic's, not the kernel's; the error is not zero."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    x = torch.randn(3, 5, 96)
    x[0, 0, 0] = 6.0  # an outlier widens the input's steps for every row: the bound must follow it
    got = Int8Linear(linear)(x).double()
    w, xd = linear.weight.detach().double(), x.double()
    want = xd @ w.T + (0 if linear.bias is None else linear.bias.detach().double())
    levels = 255 if torch.cpu._is_vnni_supported() else 127
    sx = (xd.max().clamp_min(0) - xd.min().clamp_max(0)) / levels
    sw = w.abs().amax(dim=1) / 127  # (out,)
    bound = xd.abs().sum(-1, keepdim=True) * sw / 2 + w.abs().sum(1) * sx / 2 + w.size(1) * sw * sx / 4
    err = (got - want).abs()
    assert (err <= bound * (1 + 1e-4) + 1e-6).all(), (err / bound).max()
    assert err.max() > 0  # it did quantise


# Relative L2 error allowed between int8 and float32 logits. Each int8 matmul adds about 1.1%: inputs round
# to steps of their range / 255, ~8 standard deviations wide for a few thousand Gaussian values, so an rms
# error of 0.9% of their spread (step / sqrt(12)); weights to steps of a row's largest / 127, ~3 typical
# weights, 0.7%; together 1.1% (measured 1.1% on one 256 -> 1024 layer). The 9 matmuls of 2 blocks and
# the head, in quadrature: ~3.3%, measured 2.2-2.5% (3 seeds). A broken quantisation (a wrong scale, a lost
# bias, rows mixed up) is off by tens of percent.
LOGITS_RTOL = 0.05


def test_quantized_model_logits_and_loss_near_float32():
    """Every Linear int8 (min_weights=0): logits within LOGITS_RTOL of float32's, the loss within 1%."""
    model = wide_model()
    int8 = quantize(copy_of(model), min_weights=0)
    assert all(type(m) is not nn.Linear for m in int8.modules())
    x = torch.randint(len(CHARS), (4, WIDE["block_size"]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_loss = model(x, x)
        got, got_loss = int8(x, x)
    assert (got - want).norm() / want.norm() < LOGITS_RTOL
    assert abs(got_loss / want_loss - 1) < 0.01


def test_default_keeps_small_linears_in_float32_and_the_head_is_a_copy_of_wte():
    """Linears under MIN_WEIGHTS stay nn.Linear (int8 is slower there); the tied head becomes int8 while
    wte keeps its float32 matrix, which the head's weight reads back within half a step per row."""
    model = wide_model(tie_embeddings=True)
    wte = model.transformer.wte.weight.detach().clone()
    quantize(model, min_weights=0)
    assert isinstance(model.lm_head, Int8Linear)
    assert (
        torch.equal(model.transformer.wte.weight, wte) and model.transformer.wte.weight.dtype == torch.float32
    )
    head = model.lm_head.weight
    assert (head.dtype, head.device, head.shape) == (torch.float32, torch.device("cpu"), wte.shape)
    step = wte.abs().amax(dim=1, keepdim=True) / 127
    assert ((head - wte).abs() <= step / 2 + 1e-7).all()

    default = quantize(wide_model())
    kinds = {name: type(m) for name, m in default.named_modules() if isinstance(m, nn.Linear | Int8Linear)}
    assert (
        kinds["transformer.h.0.mlp.c_fc"] is Int8Linear and kinds["transformer.h.0.attn.c_attn"] is Int8Linear
    )
    assert kinds["lm_head"] is nn.Linear  # 65 x 256 weights < MIN_WEIGHTS
    assert MIN_WEIGHTS > 4 * 128 * 128  # so the shakespeare_char_cpu shape (n_embd 128) keeps all float32


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_engine_and_plain_loop_agree_on_an_int8_model(position):
    """The decoding engine (KV cache, CPU kernels chosen by the head's weight) gives the tokens of
    GPT.generate's plain loop on the same int8 model, greedy and sampled."""
    model = quantize(wide_model(position=position), min_weights=0)
    prompt = torch.randint(len(CHARS), (2, 3), generator=torch.Generator().manual_seed(0))
    for temperature in (0.0, 1.0):
        ref = model.generate(prompt, 20, temperature=temperature, generator=torch.Generator().manual_seed(3))
        got = generate(
            model, prompt, 20, sampling=Sampling(temperature), generator=torch.Generator().manual_seed(3)
        )
        assert torch.equal(ref, got)


def test_lora_adapters_are_merged_before_quantizing():
    from nanogpt.lora import LoRAConfig, apply_lora, merge_lora

    lora = apply_lora(wide_model(), LoRAConfig(rank=4))
    for name, p in lora.named_parameters():
        if name.endswith("lora_B"):
            nn.init.normal_(p, std=0.05)  # a trained adapter (B starts at zero)
    merged = merge_lora(copy.deepcopy(lora))
    x = torch.randint(len(CHARS), (2, 16), generator=torch.Generator().manual_seed(0))
    int8 = quantize(lora, min_weights=0)
    with torch.no_grad():
        want, got = merged(x, x)[0], int8(x, x)[0]
    assert (got - want).norm() / want.norm() < LOGITS_RTOL


def test_unsupported_combinations_are_one_clear_error():
    with pytest.raises(NanoGPTError, match="quantize must be one of none, int8"):
        check_quantize("int4", "float32", False)
    for dtype in ("bfloat16", "float16", "auto"):
        with pytest.raises(NanoGPTError, match=f"cannot run in --dtype={dtype}"):
            check_quantize("int8", dtype, False)
    with pytest.raises(NanoGPTError, match="drop --compile"):
        check_quantize("int8", "float32", True)
    check_quantize("none", "bfloat16", True)  # no quantisation: anything goes
    with torch.device("meta"):  # a model off the CPU (as on a GPU): refused, naming where it is
        off_cpu = GPT(GPTConfig(vocab_size=65, **WIDE))
    with pytest.raises(NanoGPTError, match="runs on the CPU only.*meta.*--device=cpu"):
        quantize(off_cpu)
    int8 = quantize(wide_model())
    with pytest.raises(NanoGPTError, match="inference only"):
        int8.train()


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    tok = CharTokenizer(CHARS)
    model = wide_model()
    out_dir = tmp_path_factory.mktemp("wide")
    save_checkpoint(
        {"model": model.state_dict(), "model_args": asdict(model.config), "tokenizer": tok.to_meta()}, out_dir
    )
    return out_dir, model, tok


def test_sample_with_quantize_int8(wide_ckpt, monkeypatch):
    """--quantize=int8 samples through the int8 model (the quantisation is spied on) and decodes text."""
    out_dir, _, _ = wide_ckpt
    quantized = []
    real = nanogpt.quantization.quantize

    def spy(model):
        quantized.append(real(model))
        return quantized[-1]

    monkeypatch.setattr(nanogpt.quantization, "quantize", spy)
    out = io.StringIO()
    cfg = SampleConfig(
        out_dir=str(out_dir), device="cpu", num_samples=1, max_new_tokens=30, start="Hi", quantize="int8"
    )
    (text,) = sample(cfg, out)
    assert len(quantized) == 1 and isinstance(quantized[0].transformer.h[0].mlp.c_fc, Int8Linear)
    assert len(text) == 30 and set(text) <= set(CHARS)


def test_eval_with_quantize_int8_is_within_1_percent_and_not_the_same(wide_ckpt, tmp_path, capsys):
    out_dir, _, _ = wide_ckpt
    text = tmp_path / "text.txt"
    text.write_text(
        "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 8
    )
    losses = {}
    for scheme in ("none", "int8"):
        assert (
            cli(
                [
                    "eval",
                    f"--out_dir={out_dir}",
                    "--device=cpu",
                    f"--file={text}",
                    "--json",
                    f"--quantize={scheme}",
                ]
            )
            == 0
        )
        losses[scheme] = json.loads(capsys.readouterr().out)["loss"]
    assert losses["int8"] != losses["none"] and abs(losses["int8"] / losses["none"] - 1) < 0.01


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--quantize=int8", "--dtype=bfloat16"], "cannot run in --dtype=bfloat16"),
        (["eval", "--quantize=int4"], "quantize must be one of none, int8"),
        (["serve", "--quantize=int8", "--compile=true"], "drop --compile"),
    ],
)
def test_cli_names_a_bad_combination(args, message, capsys):
    assert cli(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_serve_loads_an_int8_model_and_completes(wide_ckpt):
    pytest.importorskip("fastapi", reason="nanogpt[serve] is not installed")
    from starlette.testclient import TestClient

    from nanogpt.serve.app import Settings, create_app
    from nanogpt.serve.main import ServeConfig, load

    out_dir, _, _ = wide_ckpt
    served = load(ServeConfig(out_dir=str(out_dir), device="cpu", quantize="int8"), "cpu")
    assert isinstance(served.model.transformer.h[0].attn.c_attn, Int8Linear)
    with TestClient(create_app(lambda: served, Settings(max_batch=2))) as client:
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.01)  # the model loads in a background thread
        body = {"prompt": "Hi", "max_tokens": 10, "temperature": 0, "n": 2}
        reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 200
    texts = [c["text"] for c in reply.json()["choices"]]
    assert len(texts) == 2 and texts[0] == texts[1] and len(texts[0]) > 0


@pytest.mark.slow
def test_gguf_q8_0_reads_back_within_its_rounding(tmp_path, monkeypatch):
    """--dtype=q8_0: every matrix but the position embeddings is Q8_0 in the file (vectors float32, as
    llama.cpp's converter writes them); gguf's reader dequantises each to our weights within Q8_0's error:
    per block of 32 values, half a step d = max |value| / 127, plus d's own rounding to float16 (2^-11 of
    it, times at most 127 steps). The vocabulary is a stand-in: GPT-2's takes seconds to convert, and
    tests/test_export.py checks it."""
    gguf = pytest.importorskip("gguf")
    import nanogpt.gguf_export
    from nanogpt.data.tokenizers import get_tokenizer
    from nanogpt.gguf_export import gguf_tensors, write_gguf

    def stand_in(tokenizer, vocab_size):
        return [f"t{i}" for i in range(vocab_size)], [], [int(gguf.TokenType.NORMAL)] * vocab_size

    monkeypatch.setattr(nanogpt.gguf_export, "vocabulary", stand_in)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=320, n_layer=1, n_head=2, n_embd=64, bias=True)).eval()
    path = write_gguf(model, get_tokenizer("gpt2"), tmp_path / "model.gguf", dtype="q8_0")
    reader = gguf.GGUFReader(path)
    ours = gguf_tensors(model)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    kinds = {}
    for t in reader.tensors:
        want = ours[t.name].numpy()
        kinds[t.name] = t.tensor_type
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want.shape)
        if t.tensor_type != q8_0:
            assert np.array_equal(got, want), t.name
            continue
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(got.reshape(-1, 32) - blocks)
        assert (err <= step * (0.5 + 127 * 2**-11) + 1e-8).all(), t.name
        assert err.max() > 0, t.name  # quantised, not stored as is
    matrices = {name for name, t in ours.items() if t.dim() == 2} - {"position_embd.weight"}
    assert {n for n, k in kinds.items() if k == q8_0} == matrices
    assert kinds["position_embd.weight"] == gguf.GGMLQuantizationType.F32
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == gguf.LlamaFileType.MOSTLY_Q8_0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_on_a_gpu_is_refused_naming_the_device(wide_ckpt, capsys):
    with pytest.raises(NanoGPTError, match="runs on the CPU only.*cuda.*--device=cpu"):
        quantize(wide_model().cuda())
    out_dir, _, _ = wide_ckpt
    assert (
        cli(["sample", f"--out_dir={out_dir}", "--device=cuda", "--quantize=int8", "--max_new_tokens=2"]) == 1
    )
    assert "runs on the CPU only" in capsys.readouterr().err
