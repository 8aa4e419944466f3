"""The batcher's rules on hand-made jobs (no model): a request is answered when its own rows end, a pass
never pads past the model's context, rows keep back what could start a stop string."""

from __future__ import annotations

import asyncio

from alignkit.generation.streaming import TextStream
from alignkit.ship.serve.batcher import Batcher, Job, Row, deliver, on_step_for


class CharTokenizer:
    """One character per token id (ord), EOS = 0."""

    eos_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i)


def _job(
    loop: asyncio.AbstractEventLoop, max_tokens: int, prompt_len: int = 2, stop: list[str] | None = None
) -> Job:
    return Job("m", [[1] * prompt_len], 1, max_tokens, 1.0, 1.0, stop or [], None, CharTokenizer(), loop)


def test_a_request_is_answered_when_its_rows_end_not_when_the_pass_does() -> None:
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        short, long = _job(loop, 2), _job(loop, 6)
        order: list[str] = []

        def generate(batch: list[Job]) -> None:
            on_step = on_step_for(batch, {0})
            for step in range(6):
                on_step([ord("a") + step] * len(batch))
                order.append(f"step {step}: short ended={short.ended} long ended={long.ended}")

        batcher = Batcher(generate, max_batch_size=8, max_queue=8)
        batcher.start()
        batcher.submit(short)
        batcher.submit(long)
        await short.wait()
        await long.wait()
        await batcher.stop()
        assert (short.rows[0].text, short.rows[0].finish) == ("ab", "length")
        assert (long.rows[0].text, long.rows[0].finish) == ("abcdef", "length")
        return order

    order = asyncio.run(scenario())
    assert order[1] == "step 1: short ended=True long ended=False"  # ended after its 2nd token, mid-pass
    assert order[5] == "step 5: short ended=True long ended=True"


def test_a_pass_never_pads_past_the_models_context() -> None:
    async def scenario() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        batcher = Batcher(lambda batch: None, max_batch_size=8, max_queue=8, context=64)
        long_prompt = _job(loop, 4, prompt_len=50)  # 50 + 4 fits alone
        long_answer = _job(loop, 60, prompt_len=2)  # 2 + 60 fits alone; padded to 50 + 60 it would not
        small = _job(loop, 10, prompt_len=3)  # 50 + 10 fits beside the long prompt
        for job in (long_prompt, long_answer, small):
            batcher.waiting.append(job)
        first = batcher._take()
        second = batcher._take()
        return [
            [j.order for j in first],
            [j.order for j in second],
            [long_prompt.order, long_answer.order, small.order],
        ]

    first, second, (a, b, c) = asyncio.run(scenario())
    assert first == [a, c] and second == [b]


def test_rows_hold_back_a_possible_stop_string_and_cut_at_it() -> None:
    row = Row(0, 20, TextStream(CharTokenizer()))
    sent = [row.push(ord(ch), {0}, ["END"]) for ch in "abcEN"]
    assert "".join(sent) == "abc" and row.finish is None  # the last len("END") - 1 characters wait
    sent += [row.push(ord(ch), {0}, ["END"]) for ch in "XyEND"]
    assert "".join(sent) == "abcENXy" == row.text and row.finish == "stop"  # cut before the stop string
    eos = Row(0, 20, TextStream(CharTokenizer()))
    assert [eos.push(t, {0}, []) for t in (ord("h"), ord("i"), 0)] == ["h", "i", ""]
    assert (eos.text, eos.finish, eos.tokens) == ("hi", "stop", [ord("h"), ord("i")])


def test_a_request_that_does_not_stream_gets_its_text_once_not_a_wake_up_per_token() -> None:
    async def scenario() -> tuple[int, int, str]:
        loop = asyncio.get_running_loop()
        streamed, whole = _job(loop, 3), _job(loop, 3)
        whole.streaming = False
        rows = [(job, job.rows[0]) for job in (streamed, whole)]
        for ch in "abc":
            deliver(rows, [ord(ch)] * 2, {0})
        await asyncio.sleep(0)  # the events handed over from the "worker" arrive
        return streamed.events.qsize(), whole.events.qsize(), whole.rows[0].text

    assert asyncio.run(scenario()) == (3, 0, "abc")


def test_the_worker_admits_arriving_requests_itself_and_steps_until_the_rows_end_or_the_server_stops() -> (
    None
):
    from types import SimpleNamespace

    from alignkit.ship.serve.continuous import ContinuousBatcher

    class Counting:
        """A stepper whose rows never end; a request arrives during step `arrival` (and one cancelled)."""

        def __init__(self, rows: int = 1, arrival: int = 0) -> None:
            self.calls, self.rows, self.arrival, self.admitted = 0, rows, arrival, {}

        def __len__(self) -> int:
            return self.rows

        def advance(self, admitted: list) -> None:
            self.calls += 1
            if admitted:
                self.admitted[self.calls] = [job.name for job in admitted]
                self.rows += sum(len(job.rows) for job in admitted)
            if self.calls == self.arrival:
                gone = SimpleNamespace(
                    name="gone", cancelled=True, rows=[0], end=lambda: ended.append("gone")
                )
                batcher.submit(gone)
                batcher.submit(SimpleNamespace(name="late", cancelled=False, rows=[0, 1]))

    for stepper, stopping, calls, admitted in (
        (Counting(arrival=5), False, 64, {6: ["late"]}),  # joins at the next step, in the same worker call
        (Counting(), False, 64, {}),  # at most 64 steps before the event loop gets the batch back
        (Counting(), True, 0, {}),  # the server stops
        (Counting(rows=0), False, 0, {}),  # nothing in flight, nothing waiting
    ):
        ended: list[str] = []
        batcher = ContinuousBatcher(stepper, max_batch_size=8, max_queue=8)
        batcher.wake.set = lambda: None  # no event loop here
        batcher.stopping = stopping
        batcher._steps()
        assert (stepper.calls, stepper.admitted) == (calls, admitted)
        assert ended == (["gone"] if admitted else [])  # a cancelled request ends without a row
        assert not batcher.waiting


def test_an_answer_neither_streamed_nor_cut_at_stop_strings_is_decoded_once_when_it_ends() -> None:
    for ending in ("length", "cancelled", "stop"):
        row = Row(0, 3 if ending == "length" else 20, TextStream(CharTokenizer()))
        sent = [row.push(ord(ch), {0}, [], live=False) for ch in "ab"]
        assert (sent, row.text, row.stream.ids) == (["", ""], None, [])  # no decode per token
        if ending == "length":
            row.push(ord("c"), {0}, [], live=False)
        elif ending == "stop":
            row.push(0, {0}, [], live=False)  # EOS
        else:
            row.end("cancelled")  # its client left; the pass (or the stepper) ends the row
        assert (row.finish, row.text) == (ending, "abc" if ending == "length" else "ab")
