"""Bad input: one line on stderr, non-zero exit, no traceback."""
import pytest

from conftest import SHIM, python


def _assert_one_line_error(proc, needle):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("shardtune: error:")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], lines[0]


def _bad_samsum_dir(tmp_path, train_text):
    d = tmp_path / "samsum"
    d.mkdir()
    (d / "train.json").write_text(train_text)
    (d / "val.json").write_text('[{"id": "1", "dialogue": "A: hi", "summary": "A says hi."}]')
    return d


BASE = ["--use_peft", "--peft_method", "lora", "--max_train_step", "1", "--num_workers_dataloader", "0"]


def _train_on(tmp_path, tiny_model, samsum_dir):
    return python(SHIM, BASE + ["--model_name", str(tiny_model), "--output_dir", str(tmp_path / "o"),
                                "--samsum_dataset.data_path", str(samsum_dir)])


def test_missing_model_dir(tmp_path):
    proc = python(SHIM, BASE + ["--model_name", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")])
    _assert_one_line_error(proc, "does not exist")


def test_missing_data_file(tmp_path, tiny_model):
    proc = _train_on(tmp_path, tiny_model, tmp_path / "missing")
    _assert_one_line_error(proc, "does not exist")
    d = tmp_path / "only_train"
    d.mkdir()
    (d / "train.json").write_text('[{"id": "1", "dialogue": "A: hi", "summary": "A says hi."}]')
    proc = _train_on(tmp_path, tiny_model, d)
    _assert_one_line_error(proc, "no val.json")


def test_empty_split(tmp_path, tiny_model):
    d = _bad_samsum_dir(tmp_path, "[]")
    proc = _train_on(tmp_path, tiny_model, d)
    _assert_one_line_error(proc, "the train split has no usable examples")


def test_malformed_json(tmp_path, tiny_model):
    d = _bad_samsum_dir(tmp_path, '[{"id": "1", "dialogue": "A: hi", "summary": "ok"},\n {"id": "2", "dialogue": ')
    proc = _train_on(tmp_path, tiny_model, d)
    _assert_one_line_error(proc, "train.json: invalid JSON at line 2")


def test_missing_field_names_file_and_record(tmp_path, tiny_model):
    d = _bad_samsum_dir(tmp_path, '[{"id": "1", "dialogue": "A: hi", "summary": "ok"}, {"id": "2", "dialogue": "B: yo"}]')
    proc = _train_on(tmp_path, tiny_model, d)
    _assert_one_line_error(proc, "train.json: record 1: missing field 'summary'")


def test_unknown_dataset(tmp_path, tiny_model):
    proc = python(SHIM, BASE + ["--model_name", str(tiny_model), "--dataset", "imagenet_dataset"])
    _assert_one_line_error(proc, "unknown dataset 'imagenet_dataset'")


def test_enable_fsdp_without_torchrun(tmp_path, tiny_model):
    proc = python(SHIM, BASE + ["--enable_fsdp", "--model_name", str(tiny_model), "--output_dir", str(tmp_path / "o")])
    _assert_one_line_error(proc, "needs a distributed launch")


@pytest.mark.parametrize("flags, needle", [
    (["--use_peft", "--peft_method", "adalora"], "unknown --peft_method 'adalora'"),
    (["--lr", "abc"], "expects a value of type float"),
    (["--enable_fsdpp"], "did you mean --enable_fsdp"),
])
def test_flag_errors(tmp_path, flags, needle):
    proc = python(SHIM, BASE + ["--model_name", str(tmp_path)] + flags)
    _assert_one_line_error(proc, needle)


def test_error_line_is_one_write(monkeypatch):
    """Ranks share an unbuffered stderr: a line written in two pieces (text, then newline)
    can interleave with another rank's line, as it did in CI."""
    from shardtune.errors import UserError, exit_on_user_error

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, s):
            self.writes.append(s)

        def flush(self):
            pass

    stderr = Recorder()
    monkeypatch.setattr("sys.stderr", stderr)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    @exit_on_user_error
    def fails():
        raise UserError("bad value; fix it")

    assert fails() == 2
    import socket

    assert stderr.writes == [f"shardtune: error: [rank 1 on {socket.gethostname()}] bad value; fix it\n"]
