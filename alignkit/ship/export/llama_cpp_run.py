"""llama.cpp's side of the GGUF check, run as a child process (`python -m alignkit.ship.export.llama_cpp_run
REQUEST.json`) so that a crash inside llama.cpp ends the check, not the export: llama.cpp's AMX kernels
segfault on some Xeons (ggml-org/llama.cpp#20824), and a segfault cannot be caught in the process it hits.

The request names the GGUF file, the probe texts with the Hugging Face tokenizer's ids, the export's logits
(an .npz beside it, one array per probe) and whether to answer greedily. The figures go as JSON to the
request's `out` file (not stdout, which a library's stray print could spoil).
Imports numpy and llama_cpp only."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from typing import Any


def run(request: dict[str, Any]) -> dict[str, Any]:
    """The largest logit difference on the probes, which texts llama.cpp tokenizes as the Hugging Face
    tokenizer does, and (when asked) its greedy answers from the Hugging Face ids."""
    import numpy as np
    from llama_cpp import Llama

    with contextlib.redirect_stderr(io.StringIO()):  # llama.cpp's load log, handed to Python's stderr
        llm = Llama(
            model_path=request["path"],
            n_ctx=512,
            n_threads=os.cpu_count() or 1,
            logits_all=True,
            verbose=False,
        )
    try:
        ours = np.load(request["logits"])
        diff = 0.0
        for i, row in enumerate(request["logit_ids"]):
            llm.reset()
            llm.eval(row)
            theirs = np.asarray(llm.scores[: len(row)])
            diff = max(diff, float(np.abs(theirs - ours[f"row{i}"]).max()))
        same = [
            llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids
            for text, ids in zip(request["texts"], request["ids"])
        ]
        answers = [_greedy(llm, ids, request) for ids in request["ids"]] if request["greedy"] else None
    finally:
        llm.close()
    return {"max_logit_diff": diff, "same_tokens": same, "answers": answers}


def _greedy(llm: Any, ids: list[int], request: dict[str, Any]) -> list[int]:
    answer: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token in request["stops"] or len(answer) >= request["max_new_tokens"]:
            break
        answer.append(token)
    return answer


def main(argv: list[str]) -> None:
    import llama_cpp

    # first, so that the parent can say which kernels were in play when this process dies in one
    print(llama_cpp.llama_print_system_info().decode(errors="replace"), file=sys.stderr, flush=True)
    with open(argv[0], encoding="utf-8") as f:
        request = json.load(f)
    figures = run(request)
    with open(request["out"], "w", encoding="utf-8") as f:
        json.dump(figures, f)


if __name__ == "__main__":
    main(sys.argv[1:])
