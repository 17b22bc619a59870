"""Can the demo's tiny LLM learn the comparison that easy-VQA's yes/no questions need, with the image's fact as TEXT?

The demo model answers easy-VQA's yes/no questions at the question prior (README, demo section). This probe takes the
vision side out: a random LLM of the demo's shape (the demo tokenizer) reads an easy-VQA yes/no question in a chat
template and an answer that first states the fact ("Is there not a red shape? ... Assistant: blue , yes"), and is
trained on the yes/no word only. Facts are drawn so that half match the question (no answer prior). Where the image
goes, `--image-tokens N` puts N stand-ins: random vectors at the scale of the word embeddings (fresh every sample), so
the context has the demo's length. It measures how fast the compare-and-negate step is learned as a function of the
LLM's initial weight std, the learning rate, the template (the demo's `llava_med`, whose system prompt is ~30 tokens,
or the short `mistral`) and the number of image tokens (the demo has 64 + 2 delimiters). `--start-tokens N --hold H
--ramp R` is a curriculum: N stand-ins for the first H steps, then linearly more until `--image-tokens` after R more
steps. Seeded; fresh samples every step; accuracy on 512 fresh questions, always with `--image-tokens` stand-ins.

    python -m examples.easy_vqa.probe_yes_no --init-std 0.1 --template mistral --image-tokens 0
    python -m examples.easy_vqa.probe_yes_no --init-std 0.1 --template llava_med --image-tokens 66  (demo's context)
    python -m examples.easy_vqa.probe_yes_no --image-tokens 66 --start-tokens 0 --hold 500 --ramp 700 --steps 1600
Results: results/yes_no_probe.md.
"""

from __future__ import annotations

import argparse
import random
import re
import time

import torch


def closed_questions() -> list[str]:
    """easy-VQA's yes/no question texts, with the suffix `exgra-med prepare easy-vqa` adds."""
    import easy_vqa

    from exgra_med.data.prepare.easy_vqa import question_text
    from exgra_med.data.prepare.vqa import CLOSED_YES_NO_SUFFIX, is_yes_no

    questions, answers, _ = easy_vqa.get_train_questions()
    texts = {question_text(q) for q, a in zip(questions, answers) if is_yes_no(a)}
    return sorted(t + CLOSED_YES_NO_SUFFIX for t in texts)


def sample(rng: random.Random, questions: list[str]) -> tuple[str, str, bool]:
    """(question, the fact the answer states first, answer is yes); half the facts match the question."""
    from exgra_med.data.prepare.easy_vqa import COLORS, NEGATION, SHAPES
    from exgra_med.data.prepare.vqa import CLOSED_YES_NO_SUFFIX

    question = rng.choice(questions)
    core = question.removesuffix(CLOSED_YES_NO_SUFFIX).lower()  # the suffix's "No" is not a negation
    words = re.findall(r"[a-z]+", core)
    asked_colors, asked_shapes = [w for w in words if w in COLORS], [w for w in words if w in SHAPES]
    color, shape = rng.choice(COLORS), rng.choice(SHAPES)
    if rng.random() < 0.5:
        color, shape = (asked_colors or [color])[0], (asked_shapes or [shape])[0]
    match = all(c == color for c in asked_colors) and all(s == shape for s in asked_shapes)
    fact = " ".join(([color] if asked_colors else []) + ([shape] if asked_shapes else []))
    return question, fact, match != bool(NEGATION.search(core))


def main(argv: list[str] | None = None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from exgra_med.conversation import get_template
    from exgra_med.model.tokenizer import build_word_tokenizer, default_corpus

    p = argparse.ArgumentParser(prog="python -m examples.easy_vqa.probe_yes_no", description=__doc__.splitlines()[0])
    p.add_argument("--init-std", type=float, default=0.02, help="std of the LLM's random weights (0.02: the demo's)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    p.add_argument("--template", default="llava_med", help="chat template (the demo's: llava_med)")
    p.add_argument("--image-tokens", type=int, default=66, help="stand-ins where the image goes (the demo: 64 + 2)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--start-tokens", type=int, default=None, help="curriculum: stand-ins in the first --hold steps")
    p.add_argument("--hold", type=int, default=0, help="curriculum: steps with --start-tokens stand-ins")
    p.add_argument("--ramp", type=int, default=0, help="curriculum: steps from --start-tokens to --image-tokens")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--every", type=int, default=100, help="report every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.start_tokens is not None and not 0 <= args.start_tokens <= args.image_tokens:
        p.error("--start-tokens must be between 0 and --image-tokens")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    questions, template = closed_questions(), get_template(args.template)
    tokenizer = build_word_tokenizer(default_corpus())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, initializer_range=args.init_std,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    embed = model.get_input_embeddings()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    yes_no = [tokenizer(" no", add_special_tokens=False).input_ids[0],
              tokenizer(" yes", add_special_tokens=False).input_ids[0]]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    def stand_ins_at(step: int) -> int:
        """Image stand-ins of training step `step` (the curriculum's, or --image-tokens)."""
        if args.start_tokens is None:
            return args.image_tokens
        done = min(1.0, max(0, step - args.hold) / max(1, args.ramp))
        return round(args.start_tokens + done * (args.image_tokens - args.start_tokens))

    def scores(n: int, image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the first token of " no" / " yes" where the answer word starts, and the answers."""
        rows, answers = [], []
        for _ in range(n):
            question, fact, yes = sample(rng, questions)
            before, after = template.render([("human", f"{question}\n<image>")], add_generation_prompt=True).split(
                "<image>")
            rows.append((encode(before), encode(after) + encode(f" {fact} ,")))
            answers.append(int(yes))
        length = max(len(a) + image_tokens + len(b) for a, b in rows)
        ids = torch.full((n, length), tokenizer.pad_token_id)
        mask = torch.zeros(n, length, dtype=torch.long)
        image = torch.zeros(n, length, dtype=torch.bool)
        for i, (a, b) in enumerate(rows):
            ids[i, : len(a)] = torch.tensor(a)
            ids[i, len(a) + image_tokens : len(a) + image_tokens + len(b)] = torch.tensor(b)
            image[i, len(a) : len(a) + image_tokens] = True
            mask[i, : len(a) + image_tokens + len(b)] = 1
        inputs = embed(ids)
        stand_ins = torch.randn(inputs.shape) * embed.weight.std().detach()
        inputs = torch.where(image[..., None], stand_ins, inputs)
        logits = model(inputs_embeds=inputs, attention_mask=mask).logits
        last = mask.sum(1) - 1
        return logits[torch.arange(n), last][:, yes_no], torch.tensor(answers)

    print(f"init std {args.init_std}, lr {args.lr}, template {args.template}, {args.image_tokens} image tokens, "
          f"LLM {args.layers} layers x {args.hidden} ({args.heads} heads)")
    print("step  train image tokens  train loss  accuracy  seconds")
    start, running = time.time(), None
    for step in range(1, args.steps + 1):
        logits, answers = scores(args.batch, stand_ins_at(step))
        loss = torch.nn.functional.cross_entropy(logits, answers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % args.every == 0:
            with torch.no_grad():
                logits, answers = scores(512, args.image_tokens)
            accuracy = (logits.argmax(1) == answers).float().mean().item()
            print(f"{step:4d}  {stand_ins_at(step):18d}  {running:10.3f}  {100 * accuracy:8.1f}  "
                  f"{time.time() - start:7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
