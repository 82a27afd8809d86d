"""The web UI's server functions, without a browser: the form, YAML round trip, data routes, jobs, chat, auth."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loraforge.config import all_fields, read_yaml  # noqa: E402
from loraforge.errors import ConfigError  # noqa: E402
from loraforge.webui import forms  # noqa: E402
from loraforge.webui.app import create_app  # noqa: E402
from loraforge.webui.command import check_exposure  # noqa: E402
from loraforge.webui.jobs import error_message, tail  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
TINY = {"model_name_or_path": "tiny-random-qwen3", "template": "qwen3", "dataset": "quickstart",
        "dataset_dir": "examples/data", "cutoff_len": 64, "output_dir": "saves/t", "max_steps": 2}


@pytest.fixture()
def client(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the CLI handlers read relative paths from the working directory, as in a terminal
    return TestClient(create_app(REPO, state_dir=tmp_path / "state"))


def test_form_is_generated_from_the_typed_config_fields():
    schema = forms.form_schema()
    fields = {f["name"]: f for g in schema for f in g["fields"]}
    assert set(fields) == set(all_fields())  # every key, each once
    assert [g["name"] for g in schema] == list(forms.GROUP_ORDER)
    assert fields["lora_rank"]["kind"] == "int" and fields["lora_rank"]["default"] == 8
    assert "LoRA rank" in fields["lora_rank"]["help"]
    assert fields["finetuning_type"]["choices"] == ["lora", "freeze", "full"]
    assert fields["quantization_bit"]["choices"] == [4, 8]
    assert fields["enable_thinking"]["choices"] == [True, False, None]  # null means something here
    assert fields["learning_rate"]["kind"] == "float" and not fields["learning_rate"]["advanced"]
    assert fields["adam_beta2"]["advanced"]  # rarely used HF training keys sit under "more"


def test_text_inputs_become_the_values_the_cli_reads():
    got = forms.values_from_form({"learning_rate": "1e-4", "lora_rank": "16", "template": "qwen3",
                                  "report_to": "none", "lora_target": "q_proj,v_proj", "max_samples": "",
                                  "bf16": True, "quantization_bit": 4})
    assert got == {"learning_rate": 1e-4, "lora_rank": 16, "template": "qwen3", "report_to": "none",
                   "lora_target": "q_proj,v_proj", "max_samples": None, "bf16": True, "quantization_bit": 4}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_loading_and_saving_a_yaml_gives_the_same_keys_and_values(client, example, tmp_path):
    path = str(example.relative_to(REPO))
    values = client.post("/api/config/load", json={"path": path}).json()["values"]
    saved = tmp_path / "again.yaml"
    res = client.post("/api/config/save", json={"path": str(saved), "values": values}).json()
    assert list(read_yaml(saved).items()) == list(read_yaml(example).items())
    assert res["problems"] == [] or example.name != "quickstart.yaml"


def test_render_shows_the_equivalent_command_line_and_every_problem(client):
    values = client.post("/api/config/load", json={"path": "examples/quickstart.yaml"}).json()["values"]
    values.update(max_steps="5", template="qwen3")
    del values["seed"]
    res = client.post("/api/config/render", json={"values": values, "source": "examples/quickstart.yaml"}).json()
    assert res["command"] == "loraforge train examples/quickstart.yaml max_steps=5 template=qwen3 seed=42"
    assert yaml.safe_load(res["yaml"])["max_steps"] == 5
    values.update(lora_rank="abc", lora_rnak=4)
    problems = client.post("/api/config/render", json={"values": values}).json()["problems"]
    assert any("`lora_rank`" in p and "expected an integer" in p for p in problems)
    assert any("unknown key `lora_rnak`" in p and "lora_rank" in p for p in problems)


def test_errors_come_back_with_the_cli_wording(client):
    res = client.post("/api/config/load", json={"path": "examples/nope.yaml"})
    assert res.status_code == 400 and "does not exist" in res.json()["error"]
    res = client.post("/api/jobs/train", json={"values": {**TINY, "dataset": None}})
    assert res.status_code == 400 and "dataset" in res.json()["error"]


def test_exposing_the_ui_needs_a_password(tmp_path):
    assert check_exposure("127.0.0.1", None) is None and check_exposure("localhost", None) is None
    with pytest.raises(ConfigError, match="--password or set LORAFORGE_WEBUI_PASSWORD"):
        check_exposure("0.0.0.0", None)
    assert "password" in check_exposure("0.0.0.0", "s3cret")
    guarded = TestClient(create_app(REPO, state_dir=tmp_path, password="s3cret"))
    assert guarded.get("/api/schema").status_code == 401
    good = base64.b64encode(b"me:s3cret").decode()
    assert guarded.get("/api/jobs", headers={"Authorization": f"Basic {good}"}).status_code == 200
    bad = base64.b64encode(b"me:wrong").decode()
    assert guarded.get("/api/jobs", headers={"Authorization": f"Basic {bad}"}).status_code == 401


def test_preview_marks_trained_tokens_and_reports_a_bad_index(client, tiny_qwen3_path):
    res = client.post("/api/data/preview", json={"values": TINY, "index": 1}).json()
    assert res["rc"] == 0 and res["error"] is None
    assert "example 1 of quickstart" in res["output"] and "\x1b[42;30m" in res["output"]
    bad = client.post("/api/data/preview", json={"values": TINY, "index": 100000}).json()
    assert bad["rc"] != 0 and "--index 100000 is out of range" in bad["error"]
    listed = client.post("/api/data/datasets", json={"values": TINY}).json()["datasets"]
    assert {"quickstart", "quickstart_eval"} <= {d["name"] for d in listed}


def test_convert_and_register_keep_chinese_text(client, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"你好 {i}"}, {"role": "assistant", "content": "您好！"}]}
            for i in range(5)]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{broken\n", encoding="utf-8")
    out = tmp_path / "data" / "chat.json"
    res = client.post("/api/data/convert", json={"input": str(src), "output": str(out), "limit": 3}).json()
    assert res["rc"] == 0 and "wrote 3 rows" in res["output"]
    converted = json.loads(out.read_text(encoding="utf-8"))
    assert len(converted) == 3 and converted[0]["conversations"][0]["value"] == "你好 0"
    res = client.post("/api/data/register", json={"name": "chat", "file": str(out), "formatting": "sharegpt",
                                                  "dataset_dir": str(out.parent)}).json()
    assert res["rc"] == 0, res
    assert json.loads((out.parent / "dataset_info.json").read_text())["chat"]["file_name"] == "chat.json"


def test_estimate_gives_a_verdict_for_the_chosen_gpu(client):
    values = {**TINY, "model_name_or_path": "qwen3-8b", "cutoff_len": 2048}
    res = client.post("/api/estimate", json={"values": values, "gpu": "T4"}).json()
    assert res["gpu"].startswith("T4") and res["fits"] is False and res["needed_gib"] > 15
    assert any("fit" in line for line in res["lines"])


def test_log_tail_and_error_extraction(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("loading\ntrain:  10%|#  | 1/10\rtrain:  50%|#####| 5/10\n"
                   "loraforge: error: dataset_dir 'x' not found\n  fix: run from the project folder\n")
    lines = tail(log)
    assert lines[1] == "train:  50%|#####| 5/10"
    assert error_message(lines) == "loraforge: error: dataset_dir 'x' not found\n  fix: run from the project folder"


# A stand-in for `loraforge KIND CONFIG ...` (the real command runs in the browser test): it writes a training
# log row, then fails with a CLI-style error, or waits for SIGINT and exits as `train` does after a checkpoint.
FAKE_CLI = """
import json, os, signal, sys, time
import yaml
kind, config = sys.argv[1], sys.argv[2]
out = yaml.safe_load(open(config))["output_dir"]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "trainer_log.jsonl"), "w") as fh:
    fh.write(json.dumps({"current_steps": 3, "total_steps": 10, "loss": 2.5, "percentage": 30.0,
                         "remaining_time": "0:00:07", "tokens_per_second": 99.5}) + "\\n")
print("train:  30%|###       | 3/10", flush=True)
if kind != "train":
    sys.exit(0)
if out.endswith("fail"):
    print("loraforge: error: dataset_dir 'nope' not found\\n  fix: run from the project folder", flush=True)
    sys.exit(2)
signal.signal(signal.SIGINT, lambda *a: (print("SIGINT: saving a checkpoint", flush=True), sys.exit(130)))
time.sleep(30)
"""


def _wait(client, job, state="running", timeout=20.0):
    deadline = time.time() + timeout
    while job["state"] == state and time.time() < deadline:
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}/status").json()
    return job


def _started(client, res, timeout=20.0):
    """The job once its command has printed something (so the stand-in's SIGINT handler is set)."""
    job = res.json()
    deadline = time.time() + timeout
    while not job["log"]:
        if time.time() > deadline:
            raise AssertionError(f"job {job['id']} printed nothing in {timeout} s")
        time.sleep(0.1)
        job = client.get(f"/api/jobs/{job['id']}/status").json()
    time.sleep(0.2)
    return job


@pytest.fixture()
def fake_cli(client, tmp_path):
    script = tmp_path / "fake_cli.py"
    script.write_text(FAKE_CLI)
    client.app.state.ui.jobs.cli = [sys.executable, str(script)]
    return client


def test_a_failing_job_reports_the_cli_error_and_its_progress(fake_cli, tmp_path):
    client = fake_cli
    job = client.post("/api/jobs/train", json={"values": {**TINY, "output_dir": str(tmp_path / "fail")}})
    job = job.json()
    assert job["command"].startswith("loraforge train ") and job["command"].endswith("run.yaml")
    run_yaml = Path(job["config"])
    assert read_yaml(run_yaml)["model_name_or_path"] == "tiny-random-qwen3"  # the job runs a plain YAML file
    job = _wait(client, job)
    assert job["state"] == "failed" and job["rc"] == 2
    assert job["error"] == "loraforge: error: dataset_dir 'nope' not found\n  fix: run from the project folder"
    assert job["progress"]["loss"] == [[3, 2.5]] and job["progress"]["eta"] == "0:00:07"
    assert client.get("/api/jobs").json()[0]["id"] == job["id"]


def test_a_stopped_job_is_resumable_and_a_new_ui_reattaches(fake_cli, tmp_path):
    client = fake_cli
    job = _started(client, client.post("/api/jobs/train", json={"values": {**TINY, "output_dir": str(tmp_path / "o")}}))
    # a second UI on the same job folder (a restart) sees the job running, and can stop it
    again = TestClient(create_app(REPO, state_dir=tmp_path / "state"))
    assert again.get("/api/jobs").json()[0]["state"] == "running"
    res = client.post("/api/jobs/train", json={"values": TINY})
    assert res.status_code == 400 and "still running" in res.json()["error"]
    again.post(f"/api/jobs/{job['id']}/stop", json={})
    job = _wait(again, again.get(f"/api/jobs/{job['id']}/status").json())
    assert job["state"] == "stopped" and job["rc"] == 130 and "SIGINT" in "\n".join(job["log"])
    values = {**TINY, "output_dir": str(tmp_path / "o")}
    resumed = _started(client, client.post("/api/jobs/train", json={"values": values, "resume": True}))
    assert resumed["command"].endswith("resume_from_checkpoint=true")
    client.post(f"/api/jobs/{resumed['id']}/stop", json={})
    assert _wait(client, resumed)["state"] == "stopped"
    res = client.post(f"/api/jobs/{resumed['id']}/stop", json={})
    assert res.status_code == 400 and "is not running" in res.json()["error"]


def test_chat_streams_answers_and_says_when_nothing_is_loaded(client, tiny_qwen3_path):
    lines = client.post("/api/chat/stream", json={"slot": "base", "messages": [{"role": "user", "content": "hi"}]})
    assert "no base model is loaded" in lines.json()["error"]
    loaded = client.post("/api/chat/load", json={"slot": "base", "values": TINY}).json()
    assert loaded["base"] and loaded["adapter"] is None
    res = client.post("/api/chat/stream", json={"slot": "base", "max_new_tokens": 6,
                                                "messages": [{"role": "user", "content": "你好"}]})
    events = [json.loads(line) for line in res.text.splitlines()]
    assert events[-1]["done"] and all("kind" in e for e in events[:-1]) and len(events) > 1
    assert client.post("/api/chat/unload", json={"slot": "base"}).json()["base"] is None


def test_template_check_warns_when_the_template_renders_unlike_the_tokenizer(client, tiny_qwen3_path):
    same = client.post("/api/template/check", json={"values": TINY}).json()
    assert same == {"warning": None, "template": "qwen3"}
    other = client.post("/api/template/check", json={"values": {**TINY, "template": "qwen3_nothink"}}).json()
    assert other["template"] == "qwen3_nothink" and "`qwen3` matches the model's template" in other["warning"]


def test_results_of_a_comparison_are_read_back(fake_cli, tmp_path):
    client = fake_cli
    out = tmp_path / "eval"
    job = client.post("/api/jobs/eval", json={"values": {**TINY, "output_dir": str(out), "eval_dataset": "quickstart_eval"},
                                              "variants": "base,saves/t"}).json()
    assert job["command"].endswith("--compare base,saves/t")
    assert _wait(client, job)["state"] == "finished"
    (out / "compare").mkdir(parents=True)
    rows = {"samples": 2, "variants": [{"variant": "base", "scores": {"bleu-4": 1.0}}]}
    (out / "compare" / "comparison.json").write_text(json.dumps(rows))
    res = client.get(f"/api/jobs/{job['id']}/results").json()
    assert res["comparison"] == rows and res["chart"] is False
    assert client.get(f"/api/jobs/{job['id']}/chart.png").status_code == 404


def test_the_command_refuses_another_host_without_a_password(capsys, monkeypatch):
    from loraforge.cli import main

    monkeypatch.delenv("LORAFORGE_WEBUI_PASSWORD", raising=False)
    assert main(["webui", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "--host 0.0.0.0" in err and "needs a password" in err and "--host 127.0.0.1" in err


def test_a_dataset_dir_beside_the_loaded_yaml_still_works_from_the_job_folder(tmp_path):
    from loraforge.webui.app import runnable

    (tmp_path / "proj" / "data").mkdir(parents=True)
    got = runnable({"dataset_dir": "data", "lora_rank": "4"}, "proj/run.yaml", tmp_path)
    assert got == {"dataset_dir": str(tmp_path / "proj" / "data"), "lora_rank": 4}
    assert runnable({"dataset_dir": "examples/data"}, None, REPO) == {"dataset_dir": "examples/data"}  # cwd first
