"""Continuous batching (`exgra_med.serve.continuous`): admission within the row and token budgets, the per-row decoding
state, greedy answers equal to single requests when rows join and leave mid-flight, cancel and close, and a short
request sent to a real `serve-api` server while a long one decodes."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from PIL import Image

from exgra_med.conversation import get_template
from exgra_med.model.auto import LoadOptions
from exgra_med.model.backend import DecodeState, Prompt
from exgra_med.serve.batching import Job, ServerClosingError, StaticScheduler
from exgra_med.serve.continuous import ContinuousScheduler
from exgra_med.serve.engine import GenerationSettings, InferenceEngine
from tests.conftest import start_api_server

QUESTIONS = ["What color is the shape?", "Is there a circle in the image?", "Describe the image."]
# A row that stays busy whatever the tiny model says (greedy, so the same tokens every time).
LONG = GenerationSettings(max_new_tokens=120, min_new_tokens=120)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = InferenceEngine.from_path(str(tiny_model_dir), LoadOptions(device="cpu"))
    yield engine
    engine.close()


def _image(red: int = 200) -> Image.Image:
    return Image.new("RGB", (48, 32), (red, 20, 20))


def _job(n_tokens: int) -> Job:
    return Job(Prompt(list(range(n_tokens))), GenerationSettings(max_new_tokens=4), get_template("llava_med"))


def test_admission_is_first_come_first_served_within_the_row_and_token_budgets():
    scheduler = ContinuousScheduler(engine=None, max_batch_size=4, max_queue=8, max_batch_tokens=16)
    jobs = [_job(5), _job(6), _job(20), _job(3), _job(2)]
    cancelled = _job(1)
    cancelled.cancel()
    scheduler._waiting = [jobs[0], cancelled, *jobs[1:]]
    # 2 running rows leave 14 tokens: 5 + 6 join, the 20-token prompt does not fit and the later ones wait behind it.
    assert scheduler._admit(running=2) == jobs[:2]
    assert cancelled.done and cancelled.finish_reason == "cancelled"
    # A prompt above the whole budget joins alone.
    assert scheduler._admit(running=1) == [jobs[2]]
    # The row limit: 3 running rows leave one place.
    assert scheduler._admit(running=3) == [jobs[3]]
    assert scheduler._admit(running=4) == []
    assert scheduler._admit(running=0) == [jobs[4]]
    assert scheduler.batch_sizes == [2, 1, 1, 1]
    scheduler.close()
    assert scheduler._admit(running=1) is None
    with pytest.raises(ValueError, match="max_batch_tokens"):
        ContinuousScheduler(engine=None, max_batch_tokens=0)


def test_decode_state_rows_survive_concat_and_select(engine):
    backend = engine.backend
    prompts = [backend.encode_conversation([("human", q)], _image() if i != 1 else None)
               for i, q in enumerate(QUESTIONS[:2])]
    with torch.inference_mode():
        (_, first), (_, second) = backend.prefill([prompts[0]]), backend.prefill([prompts[1]])
        merged = DecodeState.concat([first, second])
        assert merged.rows == 2 and merged.attention_mask.shape[1] == max(len(p.input_ids) for p in prompts)
        for index, alone in enumerate((first, second)):
            back = merged.select([index])
            assert torch.equal(back.attention_mask, alone.attention_mask)
            assert torch.equal(back.last_positions, alone.last_positions)
            for (k, v, *_), (k1, v1, *_) in zip(back.cache, alone.cache):
                assert torch.equal(k, k1) and torch.equal(v, v1)


def test_a_generated_image_placeholder_token_is_decoded_as_text(engine):
    """`generate` feeds generated tokens to the language model; a step must not ask for pixels for one of them."""
    backend = engine.backend
    placeholder = backend.model.config.image_token_id
    with torch.inference_mode():
        _, state = backend.prefill([backend.encode_conversation([("human", QUESTIONS[0])], _image())])
        logits = backend.decode_step(state, torch.tensor([placeholder]))
    assert logits.shape == (1, backend.model.get_output_embeddings().out_features) and state.rows == 1


def test_greedy_answers_equal_single_requests_when_rows_join_and_leave_mid_flight(engine):
    static = InferenceEngine(engine.backend, batching="static")
    cases = [([("human", q)], img, GenerationSettings(max_new_tokens=n))
             for q, img, n in zip(QUESTIONS, [_image(), None, _image(90)], [5, 8, 3])]
    try:
        alone = [static.answer(*case) for case in cases]
        long_alone = static.submit([("human", QUESTIONS[2])], _image(), LONG)
        list(long_alone.pieces())
    finally:
        static.close()
    assert [engine.answer(*case) for case in cases] == alone

    long = engine.submit([("human", QUESTIONS[2])], _image(), LONG)
    assert long.next_piece() is not None  # the long row is decoding
    sampled = engine.submit([("human", QUESTIONS[0])], _image(), GenerationSettings(max_new_tokens=6, temperature=1.0))
    joined = [engine.submit(*case) for case in cases]  # they join the running row, beside a sampled one
    assert ["".join(job.pieces()) for job in joined] == alone
    list(sampled.pieces())
    assert not long.done  # the short ones finished while the long one still decodes
    long.cancel()
    list(long.pieces())
    assert long.finish_reason == "cancelled" and 0 < len(long.generated) < LONG.max_new_tokens
    assert long.generated == long_alone.generated[: len(long.generated)]  # joins and leaves changed none of its tokens
    assert engine.scheduler.largest_batch >= 2


def test_the_model_generation_config_applies_as_in_generate(engine, monkeypatch):
    """A repetition penalty in the model's generation config changes greedy answers, the same way in both
    schedulers, also for rows that join a running one."""
    settings = GenerationSettings(max_new_tokens=12)
    cases = [([("human", q)], img, settings) for q, img in zip(QUESTIONS, [_image(), None])]
    plain = [engine.answer(*case) for case in cases]
    monkeypatch.setattr(engine.backend.decoder.generation_config, "repetition_penalty", 3.0)
    static = InferenceEngine(engine.backend, batching="static")
    try:
        alone = [static.answer(*case) for case in cases]
    finally:
        static.close()
    assert alone != plain  # the penalty changes the answers of this model
    long = engine.submit([("human", QUESTIONS[2])], _image(), LONG)
    assert long.next_piece() is not None
    assert ["".join(job.pieces()) for job in [engine.submit(*case) for case in cases]] == alone
    long.cancel()
    list(long.pieces())


def test_a_failed_prefill_fails_the_joining_request_only(engine, monkeypatch):
    long = engine.submit([("human", QUESTIONS[2])], None, LONG)
    assert long.next_piece() is not None
    prefill = engine.backend.prefill

    def broken(prompts):
        raise RuntimeError("prefill broke")

    with monkeypatch.context() as patch:
        patch.setattr(engine.backend, "prefill", broken)
        with pytest.raises(RuntimeError, match="prefill broke"):
            list(engine.submit([("human", QUESTIONS[0])], None, GenerationSettings(max_new_tokens=3)).pieces())
    assert engine.backend.prefill == prefill
    short = engine.submit([("human", QUESTIONS[0])], None, GenerationSettings(max_new_tokens=3))
    assert "".join(short.pieces()) == engine.answer([("human", QUESTIONS[0])], None, GenerationSettings(3))
    assert not long.done  # the running row went on through both
    long.cancel()
    list(long.pieces())
    assert long.finish_reason == "cancelled"


def test_close_ends_running_rows_and_refuses_waiting_and_new_jobs(engine):
    small = InferenceEngine(engine.backend, max_batch_size=1)
    running = small.submit([("human", QUESTIONS[0])], None, GenerationSettings(max_new_tokens=2000,
                                                                               min_new_tokens=2000))
    assert running.next_piece() is not None
    waiting = small.submit([("human", QUESTIONS[1])], None, GenerationSettings(max_new_tokens=4))
    small.close()
    with pytest.raises(ServerClosingError):
        list(waiting.pieces())
    list(running.pieces())
    assert running.done and running.finish_reason == "length" and len(running.generated) < 2000
    with pytest.raises(ServerClosingError):
        small.submit([("human", QUESTIONS[0])], None, GenerationSettings(max_new_tokens=4))
    assert isinstance(small.scheduler, ContinuousScheduler)
    assert isinstance(InferenceEngine(engine.backend, batching="static").scheduler, StaticScheduler)
    with pytest.raises(ValueError, match="batching must be one of continuous, static"):
        InferenceEngine(engine.backend, batching="dynamic")


def test_batching_flags_are_parsed_before_the_model_loads(capsys):
    from exgra_med.serve.api import build_parser

    args = build_parser().parse_args(["--model", "m", "--batching", "static", "--max-batch-tokens", "512"])
    assert (args.batching, args.max_batch_tokens) == ("static", 512)
    assert build_parser().parse_args(["--model", "m"]).batching == "continuous"
    for bad in (["--max-batch-tokens", "0"], ["--batching", "dynamic"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--model", "m", *bad])
    assert "--max-batch-tokens: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_server_answers_a_short_request_while_a_long_one_decodes(tiny_model_dir):
    """The short request is answered, with the answer it gets alone, before the long one's stream ends: with static
    batching it would wait for the long one's 200 tokens."""
    proc, url = start_api_server(tiny_model_dir, "--max-new-tokens", "200")
    long = {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 200, "min_tokens": 200,
            "stream": True}
    short = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 3}
    try:
        with httpx.Client(base_url=url, timeout=120) as http:
            alone = http.post("/chat/completions", json=short).json()["choices"][0]["message"]["content"]
            answered: list[httpx.Response] = []
            short_done = threading.Event()

            def post_short() -> None:
                answered.append(http.post("/chat/completions", json=short))
                short_done.set()

            with http.stream("POST", "/chat/completions", json=long) as running:
                lines = running.iter_lines()
                assert next(lines).startswith("data: ")  # the long answer is decoding
                sender = threading.Thread(target=post_short)
                sender.start()
                chunks = [line for line in lines if line]
                done_before_long_ended = short_done.is_set()
                sender.join(timeout=120)
            assert chunks[-1] == "data: [DONE]" and '"finish_reason": "length"' in chunks[-2]
            assert done_before_long_ended
            assert answered[0].status_code == 200
            assert answered[0].json()["choices"][0]["message"]["content"] == alone
    finally:
        proc.terminate()
        proc.wait(timeout=30)
