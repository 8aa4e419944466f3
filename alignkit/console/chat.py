"""The console's chat: answers streamed token by token through the chat's own sampler (`stream_answer`, the
one rollout engine), every answer stored in the feedback store `serve --log-db` writes, so that a thumbs-up or
-down given in the console becomes KTO data exactly as a served model's does."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from alignkit.errors import UserError
from alignkit.ship.chat import (
    ChatSettings,
    chat_settings,
    check_chat_template,
    load_chat_model,
    stream_answer,
)
from alignkit.ship.serve.feedback import FeedbackStore

MAX_LOADED = 2  # two models side by side stay loaded; a third evicts the one used least recently


class ChatModels:
    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self.loaded: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self.lock = threading.Lock()  # one answer at a time: a CPU's cores, a GPU's memory

    def _model(self, settings: ChatSettings) -> tuple[Any, Any]:
        key = settings.model
        if key not in self.loaded:
            model, tokenizer = load_chat_model(settings)
            check_chat_template(tokenizer, settings, None)
            self.loaded[key] = (model, tokenizer)
            while len(self.loaded) > MAX_LOADED:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(key)
        return self.loaded[key]

    def stream(self, model: str, name: str, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """NDJSON lines: {"delta": text} as tokens come, then {"done": true, "id", "text"} (the id takes a
        vote), or {"error": message}. `name`: the model as the feedback store records it."""
        settings = chat_settings(
            None, model=model, **sampling
        )  # checked now: a mistake is a 400, not a cut stream
        return self._lines(settings, name, messages)

    def _lines(self, settings: ChatSettings, name: str, messages: list[dict[str, str]]) -> Iterator[str]:
        lines: queue.Queue[dict[str, Any] | None] = queue.Queue()

        def work() -> None:
            try:
                with self.lock:
                    loaded, tokenizer = self._model(settings)
                    samples = stream_answer(
                        loaded, tokenizer, messages, settings, lambda text: lines.put({"delta": text})
                    )
                text = samples.texts[0]
                completion_id = f"console-{uuid.uuid4().hex[:16]}"
                params = {"temperature": settings.temperature, "max_new_tokens": settings.max_new_tokens}
                self.store.log_completion(completion_id, name, messages, [text], int(time.time()), params)
                lines.put({"done": True, "id": completion_id, "text": text})
            except UserError as exc:
                lines.put({"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - said to the page; the console keeps serving
                lines.put({"error": f"{type(exc).__name__}: {exc}"})
            finally:
                lines.put(None)

        threading.Thread(target=work, name="alignkit-console-chat", daemon=True).start()
        while (line := lines.get()) is not None:
            yield json.dumps(line, ensure_ascii=False) + "\n"
