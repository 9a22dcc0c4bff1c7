"""`shardtune eval`: loss, perplexity and ROUGE on 20 real SAMSum test dialogues checked
against plain transformers/peft and rouge-score; GLEU over JFLEG's several references per
input; the metric code against rouge-score and hand-computed GLEU; bad data is one line."""
import json
import math

import pytest
import torch
from nltk.translate.gleu_score import corpus_gleu
from peft import PeftModel
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM

from conftest import error_lines, plain_greedy, run_cli
from shardtune.metrics import scores
from shardtune.modeling.load import load_tokenizer

NEW = 24


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_rouge_matches_rouge_score_on_fixed_strings():
    predictions = ["Amanda baked cookies and will bring Jerry some tomorrow.",
                   "The meeting is moved to Friday.", "nothing in common"]
    references = ["Amanda baked cookies. She will bring Jerry some tomorrow.",
                  "Tom and Ann moved the meeting from Thursday to Friday at 10.", "Kim is late"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    ours = scores.rouge(predictions, references)
    for name in ("rouge1", "rouge2", "rougeL"):
        assert ours[name] == pytest.approx(sum(d[name].fmeasure for d in direct) / 3, abs=1e-12)
    assert scores.rouge(["Same words here."], ["same words here"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert scores.rouge(["nothing in common"], ["Kim is late"])["rouge1"] == 0.0


def test_gleu_and_exact_match_by_hand():
    # hypothesis n-grams (1-4): 3+2+1 = 6, reference n-grams: 4+3+2+1 = 10, all 6 match:
    # GLEU = min(6/6, 6/10) = 0.6; the better of two references counts
    assert scores.gleu(["the cat sat"], [["the cat sat on", "a dog"]]) == pytest.approx(0.6)
    assert scores.exact_match(["She goes  home.", "he go"], [["She went home.", "She goes home."], ["He goes."]]) == 0.5


def test_eval_on_real_samsum_matches_plain_transformers(capsys, tmp_path, tiny_model, tiny_lora, shared_data):
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(capsys, ["eval", "--model_name", tiny_model, "--peft_model", tiny_lora,
                                      "--samsum_dataset.data_path", shared_data / "samsum", "--split", "test",
                                      "--max_samples", 20, "--max_new_tokens", NEW, "--val_batch_size", 4,
                                      "--output", report_path])
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert json.loads(out) == report
    assert report["num_samples"] == 20 and report["peft_model"] == str(tiny_lora)

    # the same 20 examples by hand, with plain transformers + peft
    records = json.loads((shared_data / "samsum" / "test.json").read_text())[:20]
    tokenizer = load_tokenizer(str(tiny_model))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tiny_lora).eval()
    loss_sum, label_tokens, generated = 0.0, 0, []
    for record in records:
        prompt = _ids(tokenizer, tokenizer.bos_token + f"Summarize this dialog:\n{record['dialogue']}\n---\nSummary:\n")
        target = _ids(tokenizer, record["summary"] + tokenizer.eos_token)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([prompt + target]),
                         labels=torch.tensor([[-100] * len(prompt) + target])).loss.item()
        loss_sum, label_tokens = loss_sum + loss * len(target), label_tokens + len(target)
        generated.append(plain_greedy(model, tokenizer, prompt, NEW))
    assert report["label_tokens"] == label_tokens
    assert report["loss"] == pytest.approx(loss_sum / label_tokens, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(loss_sum / label_tokens), rel=1e-5)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r["summary"], g) for r, g in zip(records, generated)]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert report["rouge"][name] == pytest.approx(sum(d[name].fmeasure for d in direct) / 20, abs=1e-9)
    assert report["rouge"]["rouge1"] > 0


def test_eval_grammar_scores_every_reference(capsys, tmp_path, tiny_model, shared_data):
    jfleg = shared_data / "jfleg" / "test"
    sources = (jfleg / "test.src").read_text().splitlines()[:2]
    refs = [[(jfleg / f"test.ref{k}").read_text().splitlines()[i] for k in range(4)] for i in range(2)]
    csv = tmp_path / "grammar_validation.csv"  # each input once per reference, as `shardtune prepare` writes train
    csv.write_text("input,target\n" + "".join(f'"{s}","{r}"\n' for s, rs in zip(sources, refs) for r in rs))
    code, out, err = run_cli(capsys, ["eval", "--model_name", tiny_model, "--dataset", "grammar_dataset",
                                      "--grammar_dataset.test_split", csv, "--max_new_tokens", NEW])
    assert code == 0, err
    report = json.loads(out)
    assert report["num_samples"] == 8 and report["num_prompts"] == 2

    tokenizer = load_tokenizer(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    hypotheses = [plain_greedy(model, tokenizer, _ids(tokenizer, tokenizer.bos_token +
                                                      f"Correct this to standard English: {s}\n---\nCorrected: "), NEW)
                  for s in sources]
    expected = corpus_gleu([[r.split() for r in rs] for rs in refs], [h.split() for h in hypotheses])
    assert report["gleu"] == pytest.approx(expected, abs=1e-12)


def test_bad_data_is_one_line(capsys, tmp_path, tiny_model):
    data_dir = tmp_path / "samsum"
    data_dir.mkdir()
    (data_dir / "test.json").write_text(json.dumps([{"dialogue": "A: hi", "summary": "A greets."},
                                                    {"dialogue": "B: bye"}]))
    code, out, err = run_cli(capsys, ["eval", "--model_name", tiny_model, "--samsum_dataset.data_path", data_dir,
                                      "--split", "test"])
    [line] = error_lines(err)  # one line (peft's imports may print warnings before it)
    assert code == 2 and out == "" and "Traceback" not in err
    assert str(data_dir / "test.json") in line and "record 1: missing field 'summary'" in line
    code, _, err = run_cli(capsys, ["eval", "--model_name", tiny_model, "--samsum_dataset.data_path", data_dir,
                                    "--split", "validation"])
    assert code == 2 and len(error_lines(err)) == 1 and "no val.json" in err
