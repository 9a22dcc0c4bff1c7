"""The GPU check (`bash benchmarks/gpu_check.sh`): one command, about 8 minutes, on a bare
machine with one CUDA GPU (H100 80GB or H200) and a checkout of this repository: no
../shared/data, no network, no hub. It has not yet run on a GPU.

It uses the Python it runs under (gpu_check.sh: $PYTHON, else .venv/bin/python, else
python3 on PATH), which must already have torch with CUDA. If shardtune's other
dependencies are missing it tries `pip install -e .` with constraints.txt's pins (torch
held at the installed version); offline that fails, and the failure is reported like any
other step. It builds what it
needs (gpu_assets.py: a random-init Llama with TinyLlama-1.1B's shape and a tokenizer
trained on the bundled text; the bundled SAMSum sample repeated), then runs these steps,
each a subprocess with its own timeout:

    environment       torch, CUDA, the recipe's imports; pytest, torchao, matplotlib
    assets            model, data, a ../shared/data stand-in (bundled sample only)
    lora_cpu_offload  LoRA, --enable_fsdp --fsdp_cpu_offload, then the final adapter save
    full_accum4       full fine-tune, --batch_size_training 4 --micro_batch_size 1: peak memory
    full_accum1       the same micro batch without accumulation (batch 1): the peak-memory ratio
    resume_save       LoRA, --save_steps 2, 2 steps
    resume_auto       --resume auto to step 4: resumed from step 2, metrics steps 1..4
    qlora_fsdp        --quantization 4bit --enable_fsdp (torchao NF4); skipped without torchao
    attention_paths   packed attention on the GPU's bf16 (varlen flash attention, one call per
                      layer) against SDPA once per example and the masked path: time, differences
    perf_eager        LoRA, bf16, context 2048, packed: tokens/s and MFU (PERF_VARIANTS)
    core_tests        single-process core tests on the GPU, fp32 (CORE_TESTS)

Every training run is `torchrun --standalone --nproc_per_node 1 benchmarks/gpu_step.py`
(shardtune's finetune under torch.cuda.set_sync_debug_mode("warn"), host syncs counted;
without matplotlib it skips loss.png instead of failing at the run's end).
A step that fails or times out is recorded with the tail of its stderr and the check goes
on; the report (gpu_check.json, gpu_check.md) is rewritten after every step, so a kill
loses nothing. Steps that need an earlier one (a model, a checkpoint) are skipped when it
failed, and all that would start past --budget_s. Logs: DIR/logs/STEP.{out,err}.

    python -m benchmarks.gpu_check [--out DIR] [--only STEP,...] [--perf eager,compile]
                                   [--step_timeout STEP=SECONDS ...] [--budget_s 540]
    python -m benchmarks.gpu_check --smoke    # the same steps on CPU, fp32, a micro model,
                                              # one quick test for core_tests (1.5-3 min)

DIR (the report and logs): --out, else $OUT, else benchmarks/work/gpu; the model, data and
run outputs go to --work (benchmarks/work/gpu-work). Exit 1 if a step failed or timed out.
This driver imports only the standard library: whatever the interpreter lacks, it reports.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_SCRIPT = REPO / "benchmarks" / "gpu_step.py"

# Per-step timeouts (seconds) on the GPU, each several times the expected time (a torchrun
# start with its imports is ~15 s; a 1.1B load ~10 s); --step_timeout overrides one.
TIMEOUTS = {"environment": 120, "environment_pip": 120, "assets": 150, "lora_cpu_offload": 150,
            "full_accum4": 150, "full_accum1": 150, "resume_save": 120, "resume_auto": 120, "qlora_fsdp": 180, "attention_paths": 120,
            "perf_eager": 240, "perf_compile": 300, "core_tests": 300}
# Sizes per mode: the 1.1B model on the GPU; on CPU (--smoke) a micro model, fewer steps.
MODES = {
    "gpu": dict(model="~1.1B Llama (TinyLlama-1.1B's shape, random init), bf16 compute", shape="1b",
                device="cuda", context=2048, copies=48, steps=4, perf_steps=40, warmup=10, perf_log_every=5),
    "smoke": dict(model="micro Llama (hidden 256, 2 layers), fp32", shape="smoke",
                  device="cpu", context=128, copies=1, steps=2, perf_steps=4, warmup=1, perf_log_every=1),
}
# The throughput runs, by name: extra finetune flags over the same LoRA workload. A place to
# compare attention paths: when the recipe gains a flag for the varlen path (not yet: see
# `python -m shardtune.finetuning --help`), add e.g. "varlen": ["--THAT_FLAG", "VALUE"].
PERF_VARIANTS = {"eager": [], "compile": ["--compile"]}
# Single-process tests that run on the device SHARDTUNE_TEST_DEVICE names, in fp32, and read
# nothing from shared_data but samsum/ (the stand-in has only that). Not here: 2-rank tests
# (one GPU), and tests that need the Llama 2 tokenizer or other corpora.
CORE_TESTS = [
    "tests/integration/test_loss.py::test_softcapped_logits_take_the_unfused_path",
    "tests/integration/test_loss.py::test_a_batch_without_targets_still_backwards",
    "tests/integration/test_loss.py::test_eval_under_no_grad_gives_the_same_loss",
    "tests/integration/test_parity.py::test_accumulation_matches_one_big_batch",
]
# --smoke runs one test that needs no fixture: the step's mechanics only. The selection
# above takes minutes on a shared 2-core CPU (the tiny_model fixture pretrains in-process);
# the normal suite runs those tests on CPU anyway.
SMOKE_TESTS = ["tests/unit/test_attention.py::test_lengths_split_where_transformers_does"]
# What the recipe imports at start, then what single steps need.
PROBE = r"""
import importlib, json, sys
info = {"python": sys.version.split()[0]}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.cuda.is_available())
    info["device"] = torch.cuda.get_device_name() if info["cuda"] else "cpu"
    import shardtune.recipes.sft
except Exception as err:
    info["error"] = f"{type(err).__name__}: {err}"
for name in ("transformers", "peft", "pytest", "torchao", "matplotlib"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception:
        info[name] = None
print(json.dumps(info))
"""


def _descendants(pid: int) -> list[int]:
    """Every process under pid (Linux /proc): torchrun starts each rank in a session of its
    own, so killing the launcher's process group would leave the ranks (and the GPU) busy."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log, without progress-bar redraws, and up to torchrun's "failed
    (exitcode: N)" line: the launcher's own traceback after it says nothing of the cause."""
    text = path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else ""
    kept = []
    for line in text.splitlines():
        if line.strip() and "%|" not in line:  # tqdm's bars
            kept.append(line)
        if "failed (exitcode:" in line:
            break
    return "\n".join(kept[-lines:])


def _step_timeout(item: str) -> tuple[str, float]:
    name, _, seconds = item.partition("=")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{item!r}: want STEP=SECONDS") from None


def _say(line: str) -> None:
    try:
        print(line, flush=True)
    except OSError:  # a closed stdout (a reader gone) must not end the check: the report is on disk
        pass


def _median(values: list) -> float | None:
    return statistics.median(values) if values else None


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.smoke = args, args.smoke
        self.mode = MODES["smoke" if args.smoke else "gpu"]
        # absolute: the steps run with the repository as their working directory
        self.out, self.work = args.out.resolve(), args.work.resolve()
        self.logs = self.out / "logs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.python = sys.executable
        self.deadline = time.monotonic() + args.budget_s
        self.timeouts = {**TIMEOUTS, **dict(args.step_timeout)}
        self.device = "unknown"
        self.env: dict = {}
        self.assets: dict = {}
        self.entries: list[dict] = []
        self.report = {"mode": "smoke (CPU)" if self.smoke else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "budget_s": args.budget_s, "environment": self.env, "steps": self.entries}

    # ---- running things ----------------------------------------------------------------

    def base_env(self) -> dict:
        env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               "SHARDTUNE_CACHE": str(self.work / "cache")}  # tokenized once, shared by the steps
        if self.smoke:
            env["SHARDTUNE_DEVICE"] = "cpu"
        return env

    def timeout(self, name: str) -> float:
        return max(1.0, min(self.timeouts.get(name, 300), self.deadline - time.monotonic()))

    def run(self, name: str, cmd: list[str], extra_env: dict | None = None) -> dict:
        """cmd with stdout and stderr in logs/NAME.{out,err}; on its timeout, it and every
        process under it are killed. Returns {status, log[, error]}."""
        out_log, err_log = self.logs / f"{name}.out", self.logs / f"{name}.err"
        limit = self.timeout(name)
        with open(out_log, "w") as out, open(err_log, "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env={**self.base_env(), **(extra_env or {})}, stdout=out,
                                    stderr=err, start_new_session=True)
            try:
                code = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                for pid in [*_descendants(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
                code = None
        result = {"log": str(err_log.relative_to(self.out))}
        if code is None:
            return {**result, "status": "timeout", "error": f"killed after {limit:.0f} s\n" + _tail(err_log)}
        if code:
            return {**result, "status": "failed", "error": f"exit {code}\n" + _tail(err_log)}
        return {**result, "status": "ok"}

    def train(self, name: str, flags: list[str], steps: int, log_every: int = 1, save: bool = False,
              warmup: int = 0, out_dir: str | None = None) -> dict:
        """One finetune run under torchrun (one rank) with the check's common flags, into
        work/OUT_DIR (default: NAME); its figures from metrics.jsonl, after `warmup` steps, and
        from gpu_step.py's record. Returns the entry's fields."""
        out = self.work / (out_dir or name)
        if "--resume" not in flags:
            shutil.rmtree(out, ignore_errors=True)  # a fresh run: no figures from an earlier one
        m = self.mode
        args = ["--enable_fsdp", "--model_name", self.assets["model"], "--samsum_dataset.data_path", self.assets["data"],
                "--context_length", str(m["context"]), "--num_epochs", "1", "--max_train_step", str(steps),
                "--run_validation", "False", "--save_model", str(save), "--fsdp_activation_checkpointing", "False",
                "--num_workers_dataloader", "0", "--save_metrics", "--log_every", str(log_every), "--lr", "1e-5",
                "--output_dir", str(out), *flags]
        if self.smoke:
            args += ["--mixed_precision", "False"]  # fp32 on CPU (it would be anyway: no fast bf16)
        record_file = self.work / f"{name}.step.json"
        record_file.unlink(missing_ok=True)
        cmd = [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(STEP_SCRIPT), *args]
        result = self.run(name, cmd, {"GPU_CHECK_STEP_JSON": str(record_file)})
        result["figures"] = self.figures(out, record_file, warmup)
        result["device"] = result["figures"].pop("device", self.device)
        return result

    def figures(self, out: Path, record_file: Path, warmup: int = 0) -> dict:
        figures: dict = {}
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            figures.update(device=record["device"], loss_png=record["loss_png"])
            if record["sync_debug"]:
                figures.update(sync_warnings=record["sync_warnings"], sync_sites=record["sync_sites"])
        metrics = out / "metrics.jsonl"
        if not metrics.is_file():
            return figures
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [e for e in events if e.get("event") == "step"]
        timed = [s for s in steps if s["step"] > warmup] or steps
        epochs = [e for e in events if e.get("event") == "epoch"]
        figures.update(
            steps=[s["step"] for s in steps],
            tokens_per_s=_median([s["tokens_per_s"] for s in timed]),
            mfu=_median([s["mfu"] for s in timed if s.get("mfu") is not None]),
            peak_memory_mib=max((s.get("peak_memory_mib", 0) for s in steps), default=None),
            final_loss=steps[-1]["loss"] if steps else None)
        if epochs:
            figures["peak_memory_mib_per_rank"] = epochs[-1].get("peak_memory_mib_per_rank")
        return figures

    # ---- the steps ---------------------------------------------------------------------
    # Each returns its entry's fields; "status" defaults to the run's. A check on the outputs
    # that fails turns an ok run into "failed" with the reason in "error".

    def step_environment(self) -> dict:
        result, info = self.probe()
        if info.get("torch") and info.get("error"):
            # torch is there, shardtune's other requirements are not: try to install them,
            # with torch held at the installed version (constraints.txt pins another one)
            pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if not line.startswith("torch==")]
            pin_file = self.work / "constraints-local-torch.txt"
            pin_file.write_text("\n".join(pins + [f"torch=={info['torch']}"]) + "\n")
            # offline, fail fast instead of retrying each download for minutes
            pip = self.run("environment_pip", [self.python, "-m", "pip", "install", "--retries", "1", "--timeout", "10",
                                               "-e", "."], {"PIP_CONSTRAINT": str(pin_file)})
            result, info = self.probe()
            info["pip_install"] = pip["status"] if pip["status"] == "ok" else pip["error"][-1500:]
        self.env.update(info)
        self.device = info.get("device", "unknown")
        if "torch" not in info:
            return {**result, "status": "failed",
                    "error": f"{info.get('error', result.get('error'))}\nno torch: set PYTHON to an interpreter with CUDA torch"}
        if info.get("error"):
            return {**result, "status": "failed", "error": info["error"]}
        if not self.smoke and not info["cuda"]:
            return {**result, "status": "failed", "error": "torch sees no CUDA device (--smoke runs on CPU)"}
        return {**result, "figures": {k: info.get(k) for k in ("torch", "transformers", "peft", "pytest", "torchao",
                                                                 "matplotlib")}}

    def probe(self) -> tuple[dict, dict]:
        """Run PROBE: (the run's result, what it printed)."""
        result = self.run("environment", [self.python, "-c", PROBE])
        try:
            return result, json.loads((self.logs / "environment.out").read_text().strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return result, {}

    def step_assets(self) -> dict:
        m = self.mode
        result = self.run("assets", [self.python, "-m", "benchmarks.gpu_assets", "--shape", m["shape"],
                                     "--device", m["device"], "--work", str(self.work), "--copies", str(m["copies"])])
        if result["status"] == "ok":
            self.assets.update(json.loads((self.logs / "assets.out").read_text().strip().splitlines()[-1]))
            result["figures"] = {"parameters": self.assets["parameters"]}
        return result

    def step_lora_cpu_offload(self) -> dict:
        result = self.train("lora_cpu_offload", ["--use_peft", "--peft_method", "lora", "--fsdp_cpu_offload"],
                            self.mode["steps"], save=True)
        if result["status"] == "ok" and not (self.work / "lora_cpu_offload" / "adapter_model.safetensors").is_file():
            result.update(status="failed", error="no adapter_model.safetensors after the run")
        return result

    def step_full_accum4(self) -> dict:
        return self.train("full_accum4", ["--batch_size_training", "4", "--micro_batch_size", "1"], self.mode["steps"])

    def step_full_accum1(self) -> dict:
        result = self.train("full_accum1", ["--batch_size_training", "1", "--micro_batch_size", "1"], self.mode["steps"])
        accum4 = next((e for e in self.entries if e["name"] == "full_accum4"), {}).get("figures", {})
        mine = result["figures"]
        if accum4.get("peak_memory_mib") and mine.get("peak_memory_mib"):
            mine["peak_ratio_accum4_to_accum1"] = round(accum4["peak_memory_mib"] / mine["peak_memory_mib"], 3)
        return result

    def step_resume_save(self) -> dict:
        return self.train("resume_save", ["--use_peft", "--peft_method", "lora", "--save_steps", "2"], 2, save=True)

    def step_resume_auto(self) -> dict:
        # same output_dir as resume_save: --max_train_step counts from the run's start, so
        # the resumed run trains steps 3 and 4 only
        result = self.train("resume_auto", ["--use_peft", "--peft_method", "lora", "--save_steps", "2",
                                            "--resume", "auto"], 4, save=True, out_dir="resume_save")
        if result["status"] != "ok":
            return result
        logged = (self.logs / "resume_auto.err").read_text() + (self.logs / "resume_auto.out").read_text()
        resumed = "resumed from" in logged and "step 2," in logged
        steps = result["figures"].get("steps")
        if not resumed or steps != [1, 2, 3, 4]:
            result.update(status="failed", error=f"resumed: {resumed}; metrics steps {steps} (want [1, 2, 3, 4])")
        else:
            result["note"] = "resumed from step 2; metrics steps 1-4"
        return result

    def step_qlora_fsdp(self) -> dict:
        if not self.env.get("torchao"):
            return {"status": "skipped", "note": "torchao is not importable"}
        return self.train("qlora_fsdp", ["--use_peft", "--peft_method", "lora", "--quantization", "4bit"],
                          self.mode["steps"], save=True)

    def step_attention_paths(self) -> dict:
        size = ["--rows", "2", "--seq", "512", "--repeats", "2"] if self.smoke else []
        result = self.run("attention_paths", [self.python, "-m", "benchmarks.gpu_attention",
                                              "--device", self.mode["device"], *size])
        if result["status"] == "ok":
            report = json.loads((self.logs / "attention_paths.out").read_text().strip().splitlines()[-1])
            result["figures"] = {f"{path}_{key}": report[path][key] for path in ("packed", "per_example", "masked")
                                 for key in ("ms", "max_diff_out", "max_diff_grad")}
            result["note"] = (f"{report['examples']} examples in {report['rows']} rows of {report['seq']}; "
                              f"varlen {'ran' if report['varlen_runs'] else 'not available here'}")
        return result

    def step_perf(self, variant: str) -> dict:
        m = self.mode
        name = f"perf_{variant}"
        # medians after the warm-up steps (allocator, kernels, --compile's compile)
        result = self.train(name, ["--use_peft", "--peft_method", "lora", "--batch_size_training", "4",
                                   *PERF_VARIANTS[variant]], m["perf_steps"], log_every=m["perf_log_every"],
                            warmup=m["warmup"])
        if result["status"] == "ok":
            result["note"] = f"medians of steps {m['warmup'] + 1}-{m['perf_steps']}"
        return result

    def step_core_tests(self) -> dict:
        if not self.env.get("pytest"):
            return {"status": "skipped", "note": "pytest is not installed"}
        junit = self.work / "core_tests.xml"
        junit.unlink(missing_ok=True)
        result = self.run("core_tests", [self.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                         f"--junitxml={junit}", *(SMOKE_TESTS if self.smoke else CORE_TESTS)],
                          {"SHARDTUNE_TEST_DEVICE": self.mode["device"], "SHARDTUNE_SHARED_DATA": self.assets["shared_data"]})
        if junit.is_file():
            suite = ET.parse(junit).getroot().find("testsuite")
            result["figures"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        if result["status"] == "failed":  # pytest's summary is on stdout
            result["error"] = _tail(self.logs / "core_tests.out", 40)
        result["note"] = "fp32, shared_data = bundled sample stand-in"
        return result

    # ---- the plan and the report ---------------------------------------------------------

    def plan(self) -> list[tuple[str, object, str | None]]:
        """(name, step, the step whose success it needs)."""
        needs_model = "assets"
        steps = [("environment", self.step_environment, None), ("assets", self.step_assets, "environment"),
                 ("lora_cpu_offload", self.step_lora_cpu_offload, needs_model),
                 ("full_accum4", self.step_full_accum4, needs_model), ("full_accum1", self.step_full_accum1, needs_model),
                 ("resume_save", self.step_resume_save, needs_model), ("resume_auto", self.step_resume_auto, "resume_save"),
                 ("qlora_fsdp", self.step_qlora_fsdp, needs_model),
                 ("attention_paths", self.step_attention_paths, "environment")]
        steps += [(f"perf_{v}", lambda v=v: self.step_perf(v), needs_model) for v in self.args.perf]
        return steps + [("core_tests", self.step_core_tests, "assets")]

    def execute(self) -> int:
        status = {}
        for name, step, needs in self.plan():
            if self.args.only and name not in self.args.only and name not in ("environment", "assets"):
                continue
            start = time.monotonic()
            if needs and status.get(needs) != "ok":
                entry = {"status": "skipped", "note": f"needs {needs}, which did not succeed"}
            elif self.deadline - time.monotonic() < 5:
                entry = {"status": "skipped", "note": "--budget_s spent"}
            else:
                try:
                    entry = step()
                except Exception as err:  # a bug of this script must not cost the report
                    entry = {"status": "failed", "error": f"gpu_check: {type(err).__name__}: {err}"}
            entry = {"name": name, "status": entry.pop("status"), "seconds": round(time.monotonic() - start, 1),
                     "device": entry.pop("device", self.device), **entry}
            status[name] = entry["status"]
            self.entries.append(entry)
            self.write()
            _say(self.line(entry))
        return 1 if any(s in ("failed", "timeout") for s in status.values()) else 0

    @staticmethod
    def line(e: dict) -> str:
        f = e.get("figures", {})
        shown = {k: round(f[k], 3) for k in ("tokens_per_s", "mfu", "peak_memory_mib", "sync_warnings",
                                             "peak_ratio_accum4_to_accum1") if f.get(k) is not None}
        return f"gpu_check: {e['name']:<17} {e['status']:<8} {e['seconds']:>6} s {json.dumps(shown)} {e.get('note', '')}"

    def write(self) -> None:
        self.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        for name, text in (("gpu_check.json", json.dumps(self.report, indent=1)), ("gpu_check.md", self.markdown())):
            (self.out / f"{name}.tmp").write_text(text)
            os.replace(self.out / f"{name}.tmp", self.out / name)  # a kill mid-write keeps the last whole report

    def markdown(self) -> str:
        env = self.env
        lines = [f"# GPU check: {self.device}", "",
                 f"{self.report['mode']}, started {self.report['started']}; torch {env.get('torch')}, python "
                 f"{env.get('python')}; {self.mode['model']}, {self.assets.get('parameters') or '?'} parameters, "
                 f"context {self.mode['context']}, one rank under torchrun (FSDP2). Host syncs: warnings of "
                 "torch.cuda.set_sync_debug_mode(\"warn\") over the whole process (sites in gpu_check.json).", "",
                 "| step | status | s | tokens/s | MFU | peak MiB | host syncs | note |", "|---|---|---|---|---|---|---|---|"]

        def fmt(value, spec):
            return format(value, spec) if isinstance(value, (int, float)) else ""

        for e in self.entries:
            f = e.get("figures", {})
            note = e.get("note", "")
            if f.get("peak_ratio_accum4_to_accum1") is not None:
                note = f"peak accum 4 / accum 1 = {f['peak_ratio_accum4_to_accum1']}; {note}".rstrip("; ")
            if e["status"] in ("failed", "timeout"):
                note = f"{note} see {e.get('log', 'gpu_check.json')}".strip()
            lines.append(f"| {e['name']} | {e['status']} | {e['seconds']} | {fmt(f.get('tokens_per_s'), '.0f')} | "
                         f"{fmt(f.get('mfu'), '.1%')} | {fmt(f.get('peak_memory_mib'), '.0f')} | "
                         f"{fmt(f.get('sync_warnings'), 'd')} | {note} |")
        errors = [e for e in self.entries if e.get("error")]
        for e in errors:
            lines += ["", f"## {e['name']}: {e['status']}", "", "```", e["error"][-3000:], "```"]
        return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "benchmarks" / "work" / "gpu"))
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "gpu-work",
                        help="model, data, run outputs (GBs: kept out of DIR; a rerun reuses the model)")
    parser.add_argument("--smoke", action="store_true", help="the same steps on CPU, fp32, a micro model")
    parser.add_argument("--budget_s", type=float, default=540, help="steps that would start later are skipped")
    parser.add_argument("--step_timeout", action="append", default=[], metavar="STEP=SECONDS", type=_step_timeout,
                        help="override one step's timeout (repeatable)")
    parser.add_argument("--only", type=lambda s: s.split(","), default=[],
                        help="comma-separated steps to run (environment and assets always run)")
    parser.add_argument("--perf", type=lambda s: s.split(","), default=["eager"],
                        help=f"throughput variants, comma-separated, of {', '.join(PERF_VARIANTS)}")
    args = parser.parse_args(argv)
    unknown = [v for v in args.perf if v not in PERF_VARIANTS]
    if unknown:
        parser.error(f"unknown --perf {unknown}; known: {list(PERF_VARIANTS)}")
    check = Check(args)
    code = check.execute()
    _say(f"gpu_check: report in {check.out / 'gpu_check.md'} and gpu_check.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
