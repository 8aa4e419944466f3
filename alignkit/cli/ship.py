"""`alignkit serve`, `alignkit chat` and `alignkit export`: the trained model put to use."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from alignkit.cli.common import add_command, none_given

EPILOG_SERVE = """examples:
  alignkit serve --model out/sft
  alignkit serve --model models/base --adapter dpo=out/dpo-lora --adapter kto=out/kto-lora --port 8000
  alignkit serve --model out/dpo --api-key secret --log-db feedback.db
  then: OpenAI clients at http://127.0.0.1:8000/v1 (model ids from GET /v1/models)
"""
EPILOG_CHAT = """examples:
  alignkit chat --model out/sft --system "You are a helpful assistant."
  alignkit chat --model models/base --adapter out/dpo-lora
  alignkit chat examples/inference/llama3_lora_sft.yaml      # LLaMA-Factory's inference config keys
  in the chat: /reset clears the history, /system TEXT sets the system prompt, /exit leaves
"""
EPILOG_EXPORT = """examples:
  alignkit export --model models/base --adapter out/dpo-lora --output out/dpo-merged
  alignkit export --model models/base --adapter out/dpo-lora --output out/dpo-int8 --quantize int8
  alignkit export examples/merge_lora/llama3_lora_sft.yaml   # LLaMA-Factory's merge config keys
  alignkit export --adapter out/dpo-lora --output out/dpo-gguf --format gguf --quantize q8_0   # + Modelfile
"""

EPILOG_MERGE = """examples (mergekit's YAML; model paths may be LoRA adapter folders or GGUF files):
  alignkit merge merge.yaml --output out/merged
    merge_method: linear
    models: [{model: out/dpo-lora, parameters: {weight: 0.5}}, {model: out/grpo, parameters: {weight: 0.5}}]
"""


def register(subparsers: Any) -> None:
    _register_serve(subparsers)
    _register_merge(subparsers)
    c = add_command(subparsers, "chat", "chat with a model in the terminal", EPILOG_CHAT)
    c.add_argument("config", nargs="?", help="LLaMA-Factory inference YAML (model_name_or_path, ...)")
    c.add_argument("--model", help="model folder, LoRA adapter folder or hub id")
    c.add_argument("--adapter", help="a LoRA adapter folder on --model")
    c.add_argument("--system", help="system prompt")
    c.add_argument("--max-new-tokens", type=int, help="default 512")
    c.add_argument("--temperature", type=float, help="0 is greedy (default 0.7)")
    c.add_argument("--top-p", type=float, help="default 0.9")
    c.set_defaults(run=chat)
    x = add_command(
        subparsers,
        "export",
        "merge a LoRA adapter into its base and write a Hugging Face folder",
        EPILOG_EXPORT,
    )
    x.add_argument("config", nargs="?", help="LLaMA-Factory merge YAML (model_name_or_path, export_dir, ...)")
    x.add_argument("--model", help="base model folder or hub id (default: the adapter's base)")
    x.add_argument("--adapter", help="LoRA adapter folder")
    x.add_argument("--output", help="folder to write")
    x.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="weights' dtype (default: the base's)")
    x.add_argument(
        "--shard-size", type=float, dest="shard_size_gb", help="GB per safetensors shard (default 5)"
    )
    x.add_argument(
        "--quantize",
        help="hf: int8 | int4 (bitsandbytes, CPU or GPU); gguf: f32 | f16 (default) | q8_0",
    )
    x.add_argument(
        "--format", help="hf (a Hugging Face folder, default) | gguf (a GGUF file + Ollama Modelfile)"
    )
    x.add_argument("--device", help="where to merge: cpu or cuda (default cpu)")
    x.set_defaults(run=export)


def _register_merge(subparsers: Any) -> None:
    m = add_command(
        subparsers,
        "merge",
        "merge fine-tunes of one base (linear, slerp, ties, dare) through mergekit",
        EPILOG_MERGE,
    )
    m.add_argument("config", help="mergekit's merge YAML (merge_method, models, base_model, ...)")
    m.add_argument("--output", help="folder to write (default: the config's `output`)")
    m.add_argument("--seed", type=int, default=0, help="for DARE's random drops")
    m.set_defaults(run=merge)


def merge(args: argparse.Namespace) -> int:
    from alignkit import api

    print(api.merge(args.config, output=args.output, seed=args.seed).summary())
    return 0


def _register_serve(subparsers: Any) -> None:
    v = add_command(subparsers, "serve", "an OpenAI-compatible API server", EPILOG_SERVE)
    v.add_argument("--model", required=True, help="model folder, LoRA adapter folder or hub id")
    v.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter on --model, served as model id NAME (repeatable)",
    )
    v.add_argument("--served-model-name", help="model id of --model (default: --model as given)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="sampling engine (vllm: GPU)")
    v.add_argument("--api-key", help="bearer token clients must send (default: $ALIGNKIT_API_KEY, else none)")
    v.add_argument(
        "--batching",
        choices=["continuous", "pass"],
        default="continuous",
        help="hf backend: continuous (requests join the running batch at the next token) or pass (waiting "
        "requests start together and the batch ends with its longest answer)",
    )
    v.add_argument("--max-batch-size", type=int, default=32, help="sequences generated together")
    v.add_argument(
        "--max-queue", type=int, default=256, help="waiting requests beyond which the answer is 503"
    )
    v.add_argument(
        "--max-input-tokens", type=int, help="longest prompt accepted (default: the model's context)"
    )
    v.add_argument("--max-request-bytes", type=int, help="largest request body accepted (default 4 MiB)")
    v.add_argument("--max-n", type=int, default=16, help="largest `n` (choices per request) accepted")
    v.add_argument(
        "--log-db", help="store every completion and its feedback: a SQLite path or postgresql:// URL"
    )
    v.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    v.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when there is one)")
    v.add_argument("--trust-remote-code", action="store_true")
    v.set_defaults(run=serve)


def serve(args: argparse.Namespace) -> int:
    from alignkit.ship.serve.command import ServeSettings, serve_forever

    fields = [f.name for f in dataclasses.fields(ServeSettings)]
    return serve_forever(ServeSettings(**{name: getattr(args, name) for name in fields}))


def chat(args: argparse.Namespace) -> int:

    from alignkit.ship.chat import GIVEN, run_terminal_chat

    return run_terminal_chat(args.config, **none_given(args, *GIVEN))


def export(args: argparse.Namespace) -> int:

    from alignkit import api
    from alignkit.ship.export.card import render_summary
    from alignkit.ship.export.gguf_out import GGUFExport
    from alignkit.ship.export.merge import LOGIT_PROBES

    given = ("model", "adapter", "output", "dtype", "quantize", "shard_size_gb", "device", "format")
    result = api.export(args.config, **none_given(args, *given))
    print(result.summary() if isinstance(result, GGUFExport) else render_summary(result, LOGIT_PROBES))
    return 0
