"""`alignkit export --format gguf`: one GGUF file and an Ollama Modelfile. The file, read back by transformers'
GGUF reader, gives the merged model's logits (f32: to float rounding; f16: within half precision), its
tokenizer and chat template; q8_0 reports greedy agreement; the rope rows are permuted to llama.cpp's layout and
back (GQA on the real model); bad combinations of flags exit 2 and write nothing."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tests.ship.test_export import _export, _fails, _figure
from tests.ship.test_export import adapter as adapter  # noqa: F401 - the module's LoRA adapter fixture
from tests.ship.test_export import base as base  # noqa: F401 - its tiny base


def _read_back(folder: str, name: str) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _logits(model: torch.nn.Module, tok: object, text: str) -> torch.Tensor:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
    )
    with torch.no_grad():
        return model(torch.tensor([ids["input_ids"]])).logits[0]


def test_gguf_types_read_back_as_the_merged_model(adapter: str, tmp_path: Path) -> None:  # noqa: F811
    from alignkit.modeling.load import load_causal_lm

    merged = str(tmp_path / "hf")
    _export(["--adapter", adapter, "--output", merged, "--dtype", "fp32"])
    reference, ref_tok = load_causal_lm(merged, "float32")
    sizes = {}
    for kind in ("f32", "f16", "q8_0"):
        out = tmp_path / kind
        printed = _export(
            ["--adapter", adapter, "--output", str(out), "--format", "gguf", "--quantize", kind]
        )
        name = f"{kind}.{kind}.gguf"
        assert sorted(os.listdir(out)) == ["Modelfile", name]  # the Hugging Face folder it came from is gone
        sizes[kind] = (out / name).stat().st_size
        model, tok = _read_back(str(out), name)
        ours, theirs = _logits(reference, ref_tok, "Name a colour."), _logits(model, tok, "Name a colour.")
        scale = max(1.0, ours.abs().max().item())
        if kind == "f32":
            assert (ours - theirs).abs().max().item() <= 1e-5 * scale
            assert _figure(r"largest logit difference ([\d.e-]+)", printed) <= 1e-4 * scale
        elif kind == "f16":
            assert (ours - theirs).abs().max().item() <= 0.02 * scale
        else:
            assert 0.0 <= _figure(r"read back: ([\d.]+) of 8 greedy answers", printed) <= 1.0
        assert tok.chat_template == ref_tok.chat_template
        assert tok("What is 12 + 7?")["input_ids"] == ref_tok("What is 12 + 7?")["input_ids"]
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"]
    modelfile = (tmp_path / "f16" / "Modelfile").read_text()
    assert modelfile.startswith(
        'FROM ./f16.f16.gguf\nTEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}'
    )
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_gguf_flag_mistakes_exit_2_and_write_nothing(
    adapter: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "x"
    err = _fails(capsys, ["--adapter", adapter, "--output", str(out), "--quantize", "q8_0"])
    assert "a Hugging Face export quantizes to int8 or int4" in err and "--format gguf" in err
    err = _fails(
        capsys, ["--adapter", adapter, "--output", str(out), "--format", "gguf", "--quantize", "int8"]
    )
    assert "with --format gguf choose one of f32, f16, q8_0, q2_k, q3_k_m, q4_k_s, q4_k_m" in err
    real_find_spec = importlib.util.find_spec  # the k-quants without llama.cpp's quantizer installed
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real_find_spec(n, *a)
    )
    err = _fails(
        capsys, ["--adapter", adapter, "--output", str(out), "--format", "gguf", "--quantize", "q4_k_m"]
    )
    assert "pip install llama-cpp-python" in err and "llama-quantize FILE.f16.gguf OUT.gguf Q4_K_M" in err
    err = _fails(capsys, ["--adapter", adapter, "--output", str(out), "--format", "onnx"])
    assert "--format onnx: choose hf or gguf" in err
    assert not out.exists()


CRASH = "import os, signal, sys; print('CPU : AVX2 = 1 | AMX_INT8 = 1 |', file=sys.stderr, flush=True); os.kill(os.getpid(), signal.SIGSEGV)"
FAIL = "import sys; sys.exit('llama_model_load: error loading model: unknown type')"


@pytest.mark.parametrize(
    ("child", "said"),
    [
        (CRASH, "it died of SIGSEGV; this llama.cpp was built with AMX kernels"),
        (FAIL, "it failed (llama_model_load: error loading model: unknown type)"),
    ],
)
def test_llama_cpp_dying_on_the_file_ends_its_check_not_the_export(
    base: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    child: str,
    said: str,
) -> None:
    """llama.cpp runs the file in a child process: its AMX kernels segfault on some Xeons (ggml-org/llama.cpp
    #20824), which here would kill the export after the file is written. The export exits 0 with the file,
    transformers' read-back figures, and what happened to llama.cpp."""
    import sys

    from alignkit.ship.export import gguf_check

    monkeypatch.setattr(gguf_check, "llama_cpp_installed", lambda: True)
    monkeypatch.setattr(gguf_check, "child_command", lambda: [sys.executable, "-c", child])
    out = tmp_path / "q"
    printed = _export(["--model", base, "--output", str(out), "--format", "gguf", "--quantize", "q8_0"])
    assert (out / "q.q8_0.gguf").stat().st_size > 0 and (out / "Modelfile").is_file()
    assert 0.0 <= _figure(r"read back: ([\d.]+) of 8 greedy answers", printed) <= 1.0
    assert f"llama.cpp could not run the file: {said}" in printed
    assert "the file is written and transformers' reader checked it" in printed
    assert "llama.cpp loads it" not in printed


def test_llamafactorys_merge_yaml_exports_gguf(base: str, adapter: str, tmp_path: Path) -> None:  # noqa: F811
    """LLaMA-Factory's merge YAML with `--format gguf`: model, adapter, export_dir and template are read, and
    `export_quantization_bit: 8` means q8_0 for a GGUF file."""
    import yaml
    from gguf import GGUFReader

    keys = {"model_name_or_path": base, "adapter_name_or_path": adapter, "template": "chatml"}
    keys |= {"finetuning_type": "lora", "export_dir": str(tmp_path / "ollama"), "export_quantization_bit": 8}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(keys))
    printed = _export([str(tmp_path / "merge.yaml"), "--format", "gguf"])
    path = tmp_path / "ollama" / "ollama.q8_0.gguf"
    assert str(path) in printed and (tmp_path / "ollama" / "Modelfile").is_file()
    assert GGUFReader(str(path)).fields["general.file_type"].contents() == 7  # LLAMA_FTYPE_MOSTLY_Q8_0


@pytest.mark.slow
def test_the_real_model_round_trips_through_gguf(smollm2: str, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (grouped-query attention: 9 heads, 3 key/value heads) to f16 GGUF and back: logits
    within half precision of the folder's, and the same answer."""
    from alignkit.modeling.load import load_causal_lm

    out = tmp_path / "smol"
    printed = _export(["--model", smollm2, "--output", str(out), "--format", "gguf", "--quantize", "f16"])
    diff, tol = _figure(r"difference ([\d.e-]+)", printed), _figure(r"tolerance ([\d.e-]+)", printed)
    assert diff <= tol
    reference, ref_tok = load_causal_lm(smollm2, "float32")
    model, tok = _read_back(str(out), "smol.f16.gguf")
    ours, theirs = (
        _logits(reference, ref_tok, "What is the capital of France?"),
        _logits(model, tok, "What is the capital of France?"),
    )
    assert (ours - theirs).abs().max().item() <= 0.02 * ours.abs().max().item()
    assert ours[-1].argmax() == theirs[-1].argmax()
    if "llama.cpp loads it" in printed:  # where llama-cpp-python is installed: llama.cpp answers as the model
        from llama_cpp import Llama

        assert (
            _figure(r"([\d.]+) of probe prompts tokenized as the Hugging Face tokenizer does", printed) == 1.0
        )
        llm = Llama(model_path=str(out / "smol.f16.gguf"), n_ctx=256, verbose=False)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = llm.create_chat_completion(
            question, temperature=0.0, max_tokens=12
        )  # the file's own template
        assert "Paris" in reply["choices"][0]["message"]["content"]
        llm.close()


def test_q4_k_m_by_llama_cpps_quantizer(tmp_path: Path) -> None:
    """`--quantize q4_k_m`: llama.cpp's quantizer makes the file from the f32 one: Q4_K_M as its file type, Q4_K
    and Q6_K tensors in it (a tiny model 256 wide, so no row falls back); transformers reads it back and
    llama.cpp loads it, both reported; llama.cpp tokenizes the probes as the Hugging Face tokenizer does."""
    pytest.importorskip(
        "llama_cpp", reason="the k-quants need llama.cpp's quantizer (pip install llama-cpp-python)"
    )
    from gguf import GGUFReader

    from alignkit.modeling.tiny import build_tiny

    model = build_tiny(str(tmp_path / "wide"), hidden_size=256, layers=2, seed=0)
    out = tmp_path / "k"
    printed = _export(["--model", model, "--output", str(out), "--format", "gguf", "--quantize", "q4_k_m"])
    path = out / "k.q4_k_m.gguf"
    assert sorted(os.listdir(out)) == ["Modelfile", path.name]
    reader = GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert {"Q4_K", "Q6_K"} <= {t.tensor_type.name for t in reader.tensors}
    assert "another type than" not in printed  # every row is a multiple of 256 wide
    assert 0.0 <= _figure(r"read back: ([\d.]+) of 8 greedy answers", printed) <= 1.0
    assert 0.0 <= _figure(r"llama.cpp loads it: .*; ([\d.]+) of greedy answers identical", printed) <= 1.0
    assert _figure(r"([\d.]+) of probe prompts tokenized as the Hugging Face tokenizer does", printed) == 1.0
