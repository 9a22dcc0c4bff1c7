"""Generation metrics for `shardtune eval`: ROUGE (summaries) and GLEU (corrections),
computed by rouge-score and nltk, the libraries the papers' numbers come from."""
from __future__ import annotations

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure over examples of ROUGE-1/2/L, with the Porter stemmer (as SAMSum
    results are usually reported). 0..1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: total / len(predictions) for name, total in totals.items()} if predictions else {}


def gleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """Corpus GLEU (nltk, n-grams 1-4) of each hypothesis against all of its references,
    on whitespace tokens. 0..1."""
    from nltk.translate.gleu_score import corpus_gleu

    return corpus_gleu([[ref.split() for ref in refs] for refs in references], [hyp.split() for hyp in hypotheses])


def exact_match(hypotheses: list[str], references: list[list[str]]) -> float:
    """Fraction of hypotheses equal to one of their references (whitespace-normalised)."""
    hits = sum(" ".join(hyp.split()) in {" ".join(ref.split()) for ref in refs}
               for hyp, refs in zip(hypotheses, references, strict=True))
    return hits / len(hypotheses) if hypotheses else 0.0
