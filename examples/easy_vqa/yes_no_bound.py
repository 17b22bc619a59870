"""How reliable must a model's image-question comparison be before its yes/no answers beat the question prior?

easy-VQA's yes/no answers follow from the question's wording most of the time ("is there a red shape?" is "no" 7
times in 8), so a model can score well on them without the image. Suppose a model has both the question prior (the
frequency of each answer per question text in training) and a comparison of the image with the question that is
right with probability r, independently of the answer. Its best answer follows the comparison where r is above the
share of the question's most frequent training answer, and the prior's answer elsewhere. On a test file its expected
closed accuracy is then the mean over the yes/no questions of r where it follows the comparison, and of the prior's
hit (the reference's closed rule) elsewhere. At r = 0.5 this is the question-only prior's accuracy; a comparison
less reliable than the prior of every question leaves every answer as the prior's.

    python -m examples.easy_vqa.yes_no_bound --train runs/demo/data/train.json \
        --test runs/demo/finetune/test_questions.json
Results: results/yes_no_probe.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

RELIABILITIES = (0.5, 0.8, 0.85, 0.9, 0.95, 0.99)


def expected_closed_accuracies(
    train: Sequence[Mapping], test: Sequence[Mapping], reliabilities: Sequence[float]
) -> list[float]:
    """Expected closed accuracy (in %) of the prior combined with a comparison right with each probability."""
    from exgra_med.eval.baselines import answer_counts_per_question, question_key, question_prior_predictions
    from exgra_med.eval.metrics import closed_hit, reference_answer

    for reliability in reliabilities:
        if not 0.5 <= reliability <= 1.0:
            raise ValueError(f"reliability must be in [0.5, 1], got {reliability}")
    closed = [r for r in test if str(r.get("answer_type", "")).upper() == "CLOSED"]
    if not closed:
        raise ValueError("the test records hold no CLOSED question")
    counts, prior = answer_counts_per_question(train), question_prior_predictions(train, closed)
    shares_and_hits = []  # per question: share of its most frequent training answer, whether the prior is right
    for record in closed:
        c = counts.get(question_key(record))
        shares_and_hits.append((max(c.values()) / sum(c.values()) if c else 0.5,
                                closed_hit(prior[str(record["id"])], reference_answer(record))))
    return [100.0 * sum(r if r > share else hit for share, hit in shares_and_hits) / len(closed)
            for r in reliabilities]


def main(argv: Sequence[str] | None = None) -> int:
    from exgra_med.io import read_json

    p = argparse.ArgumentParser(prog="python -m examples.easy_vqa.yes_no_bound", description=__doc__.splitlines()[0])
    p.add_argument("--train", required=True, help="training VQA records (the question prior's source)")
    p.add_argument("--test", required=True, help="test VQA records")
    p.add_argument("--reliability", type=float, nargs="+", default=list(RELIABILITIES),
                   help="accuracies of the comparison on its own")
    args = p.parse_args(argv)
    train, test = read_json(args.train), read_json(args.test)
    n = sum(str(r.get("answer_type", "")).upper() == "CLOSED" for r in test)
    print(f"{n} yes/no test questions; expected closed accuracy (%) of the question prior combined with a comparison")
    print("| comparison right on its own | closed accuracy |")
    print("|---:|---:|")
    for r, accuracy in zip(args.reliability, expected_closed_accuracies(train, test, args.reliability)):
        print(f"| {100 * r:.0f}% | {accuracy:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
