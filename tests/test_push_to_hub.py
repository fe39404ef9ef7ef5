"""`UDKDTrainer`'s pushes (`push_to_hub` and the pushes at each save) against tests/hub_server.LocalHub, a Hub
look-alike on 127.0.0.1.

huggingface_hub and transformers read HF_ENDPOINT / HF_TOKEN at import, so the client side (a short real
distillation, then the pushes) runs in ONE fresh subprocess per test; the server runs here, so the test also
sees every commit it stored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub  # noqa: E402

FAKE_TOKEN = "hf_udkd_push_fake_token_9731"
TESTS_DIR = Path(__file__).resolve().parent
STUDENT_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "loss_terms.png"}

CLIENT = """
    import json, logging as pylogging, sys, time
    from pathlib import Path

    import torch
    from huggingface_hub.errors import HfHubHTTPError
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessor
    from transformers.utils import logging

    sys.path.insert(0, sys.argv[2])
    from conftest import TensorImageDataset, accuracy
    from hf_udkd import UDKDTrainer, UDKDTrainingArguments

    # Everything at info level (transformers' and hf_udkd's), so that a leaked token would show in the logs.
    logging.set_verbosity_info()
    pylogging.basicConfig(level=pylogging.INFO)
    tmp = Path(sys.argv[1])
    data = load_file(tmp / "digits.safetensors")
    train = TensorImageDataset(data["train_x"], data["train_y"])
    validation = TensorImageDataset(data["val_x"], data["val_y"])
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    args = UDKDTrainingArguments(
        output_dir=str(tmp / "out"), max_steps=4, per_device_train_batch_size=16, logging_steps=2,
        save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, hub_model_id="user/distilled",
        aff_channels=16,
    )
    # The student starts from a checkpoint on the (local) Hub, the teacher from a local directory.
    trainer = UDKDTrainer("user/student-init", str(tmp / "teacher"), args, train_dataset=train,
                          eval_dataset=validation, processing_class=processor, compute_metrics=accuracy)
    trainer.train()
    trainer.evaluate()
    card_kwargs = dict(dataset="scikit-learn digits", dataset_split="validation")

    out = {"stage": "refused"}
    start = time.monotonic()
    try:
        trainer.push_to_hub(**card_kwargs)
    except HfHubHTTPError as err:
        out["status"], out["message"] = err.response.status_code, str(err)
    out["seconds"] = time.monotonic() - start
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # the test lets the server recover

    out = {"stage": "pushed", "commit_url": str(trainer.push_to_hub(**card_kwargs))}
    loaded = AutoModelForImageClassification.from_pretrained("user/distilled").eval()
    x = validation.pixel_values[:16]
    with torch.no_grad():
        out["identical_logits"] = torch.equal(trainer.student.eval()(pixel_values=x).logits,
                                              loaded(pixel_values=x).logits)
    out["processor"] = AutoImageProcessor.from_pretrained("user/distilled").to_dict()["size"]
    print(json.dumps(out), flush=True)
"""


def client_env(hub: LocalHub, hf_home: Path, token: str | None = FAKE_TOKEN) -> dict[str, str]:
    """A client environment for ``hub``: its endpoint, ``token`` as HF_TOKEN (none: no login at all), a fresh
    HF_HOME, online."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def save_digits(tmp_path: Path, digits) -> None:
    """64 training and 64 validation digits, for the client process."""
    train, validation = digits
    save_file({"train_x": train.pixel_values[:64].contiguous(), "train_y": train.labels[:64].contiguous(),
               "val_x": validation.pixel_values[:64].contiguous(), "val_y": validation.labels[:64].contiguous()},
              tmp_path / "digits.safetensors")


def read_stage(proc: subprocess.Popen, stderr_path: Path) -> dict:
    """The next JSON line the client prints (the Trainer's own log lines are skipped)."""
    for line in proc.stdout:
        if line.startswith('{"stage"'):
            return json.loads(line)
    proc.wait(timeout=30)
    log = stderr_path.read_text()[-5000:]
    raise AssertionError(f"client ended (rc {proc.returncode}) without reporting:\n{log}")


@pytest.mark.slow
def test_push_refused_then_pushed_and_loaded_back(tmp_path, resnet_teacher, resnet_student, digits):
    """The client first pushes while the server refuses every write (500), reports, waits until this process
    lets the server recover, then pushes again and loads the student back from the server."""
    save_digits(tmp_path, digits)
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(CLIENT))
    output_dir, stderr_path = tmp_path / "out", tmp_path / "client.stderr"

    with LocalHub(fail_with=500) as hub, open(stderr_path, "w") as stderr:
        # conftest saved the student's starting weights in tmp_path/student: publish them as a Hub repo.
        hub.add_repo("user/student-init", {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir()})
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(TESTS_DIR)],
            env=client_env(hub, tmp_path / "hf_home"), cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        watchdog = threading.Timer(400, proc.kill)
        watchdog.start()
        try:
            refused = read_stage(proc, stderr_path)
            # A refusing server: a fast, clear error, and a complete student on disk for a later push.
            # (seconds: the card, plot and teacher evaluation come first; a retried 500 would take over 23 s)
            assert refused["status"] == 500 and refused["seconds"] < 20, refused
            assert str(output_dir) in refused["message"] and "push_to_hub()" in refused["message"]
            assert STUDENT_FILES <= {p.name for p in output_dir.iterdir()}
            assert ("model", "user/distilled") not in hub.repos
            local_card = (output_dir / "README.md").read_bytes()

            hub.fail_with = None
            proc.stdin.write("\n")
            proc.stdin.flush()
            pushed = read_stage(proc, stderr_path)
            proc.wait(timeout=60)
        finally:
            watchdog.cancel()
            proc.kill()
        stdout_rest = proc.stdout.read()
        proc.stdout.close()
        proc.stdin.close()

        assert pushed["identical_logits"], pushed
        assert pushed["processor"] == {"height": 32, "width": 32}
        repo = hub.get_repo("user/distilled")
        assert pushed["commit_url"].endswith(repo.branches["main"])
        files = hub.files("user/distilled")
        # Only the clean student: no UniKD heads, checkpoints or training arguments, though they are on disk.
        assert set(files) == STUDENT_FILES | {".gitattributes"}
        assert (output_dir / "checkpoint-2" / "udkd_heads.safetensors").is_file()
        assert (output_dir / "training_args.bin").is_file()
        for name in STUDENT_FILES:
            assert files[name] == (output_dir / name).read_bytes(), name
        assert files["README.md"] == local_card  # the card pushed is the one written before the refusal

        card = ModelCard(files["README.md"].decode())
        assert card.data.base_model == "user/student-init"  # the student's start, not the teacher
        assert card.data.teacher_model["name"] == "teacher"
        results = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert set(results) == {"accuracy", "teacher_accuracy"}  # push_to_hub evaluated the teacher for the card
        assert "from_pretrained(\"user/distilled\")" in card.text
        assert hub.unhandled == [] and hub.internal_errors == []

        # The token reached the server, and nowhere else: not in a file, not in a log line.
        assert f"Bearer {FAKE_TOKEN}" in hub.authorizations
        logs = stderr_path.read_text() + stdout_rest + json.dumps([refused, pushed])
        assert "Loading the student from user/student-init" in logs  # the logs were captured
        assert FAKE_TOKEN not in logs
        leaked = [p for p in output_dir.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]
        assert leaked == []


STRATEGY_CLIENT = """
    import json, logging as pylogging, sys
    from pathlib import Path

    import torch
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file
    from transformers import TrainerCallback, ViTImageProcessor
    from transformers.utils import logging

    sys.path.insert(0, sys.argv[2])
    from conftest import TensorImageDataset, accuracy
    from hf_udkd import UDKDTrainer, UDKDTrainingArguments

    logging.set_verbosity_info()
    pylogging.basicConfig(level=pylogging.INFO)
    tmp, strategy, token = Path(sys.argv[1]), sys.argv[3], sys.argv[4]
    data = load_file(tmp / "digits.safetensors")
    train = TensorImageDataset(data["train_x"], data["train_y"])
    validation = TensorImageDataset(data["val_x"], data["val_y"])
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


    def arguments(output_dir, **changes):
        options = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=16, logging_steps=2,
                       save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, aff_channels=16)
        return UDKDTrainingArguments(**{**options, **changes})


    # The token only in hub_token (no HF_TOKEN, no login); every save pushes (hub_always_push), so the commits
    # are the same from run to run. The teacher comes from the (local) Hub.
    args = arguments(tmp / "out", push_to_hub=True, hub_model_id=f"user/distilled-{strategy}",
                     hub_strategy=strategy, hub_token=token, hub_always_push=True)
    trainer = UDKDTrainer(str(tmp / "student"), "user/teacher", args, train_dataset=train,
                          eval_dataset=validation, processing_class=processor, compute_metrics=accuracy)
    trainer.train()
    trainer.evaluate()
    out = {"commit_url": str(trainer.push_to_hub())}

    if strategy in ("checkpoint", "all_checkpoints"):
        # Resume from the checkpoint as pulled from the Hub, with another seed: what the first step starts from
        # must be the pushed run's student and heads, not a new start.
        folder = "last-checkpoint" if strategy == "checkpoint" else "checkpoint-4"
        pulled = Path(snapshot_download(args.hub_model_id, allow_patterns=[f"{folder}/*"],
                                        local_dir=tmp / "pulled")) / folder

        class FirstStep(TrainerCallback):
            state = None

            def on_step_begin(self, args, state, control, model=None, **kwargs):
                if self.state is None:
                    self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        first = FirstStep()
        resumed = UDKDTrainer(str(tmp / "student"), "user/teacher", arguments(tmp / "resumed", max_steps=5, seed=99),
                              train_dataset=train, processing_class=processor, callbacks=[first])
        resumed.train(resume_from_checkpoint=str(pulled))
        expected = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        out["resumed_identical"] = set(first.state) == set(expected) and all(
            torch.equal(first.state[k], expected[k]) for k in expected)
        out["resumed_steps"] = resumed.state.global_step
    print(json.dumps(out), flush=True)
"""

STRATEGY_TOKEN = "hf_udkd_strategy_fake_token_5208"
CHECKPOINT_FOLDERS = {"end": set(), "every_save": set(), "checkpoint": {"last-checkpoint"},
                      "all_checkpoints": {"checkpoint-2", "checkpoint-4"}}
# What resuming reads; udkd_noise_0 only exists for FDP runs, which this is.
RESUMABLE = {"model.safetensors", "config.json", "udkd_heads.safetensors", "udkd_noise_0.safetensors",
             "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_every_push_sends_only_the_student_and_no_token(strategy, tmp_path, resnet_teacher, resnet_student,
                                                        digits):
    """A short run with push_to_hub=True for each hub_strategy, then a bare push_to_hub() after evaluate().

    Every byte of every commit on the server is searched for the token; no commit holds the teacher, the heads
    at the root or training_args.bin; checkpoint strategies push the checkpoint that a resume from the Hub reads.
    """
    save_digits(tmp_path, digits)
    teacher_weights = (tmp_path / "teacher" / "model.safetensors").read_bytes()
    # The example script used to keep its built-in teacher in <output_dir>/teacher.
    shutil.copytree(tmp_path / "teacher", tmp_path / "out" / "teacher")
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(STRATEGY_CLIENT))
    stderr_path = tmp_path / "client.stderr"
    with LocalHub() as hub, open(stderr_path, "w") as stderr:
        hub.add_repo("user/teacher", {p.name: p.read_bytes() for p in (tmp_path / "teacher").iterdir()})
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(TESTS_DIR), strategy, STRATEGY_TOKEN],
            env=client_env(hub, tmp_path / "hf_home", token=None), cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=stderr, text=True, timeout=400,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith('{"commit_url"')]
        assert proc.returncode == 0 and lines, stderr_path.read_text()[-5000:]
        out = json.loads(lines[-1])
        assert hub.unhandled == [] and hub.internal_errors == []
        assert f"Bearer {STRATEGY_TOKEN}" in hub.authorizations  # hub_token is what authenticated the pushes

        # Every byte stored on the server, in every commit of every repository.
        stored = [(repo.repo_id, commit, path, data) for repo in hub.repos.values() for commit in repo.commits
                  for path, data in commit.files.items()]
        assert [(r, path) for r, _, path, data in stored if STRATEGY_TOKEN.encode() in data] == []

        repo = hub.get_repo(f"user/distilled-{strategy}")
        assert out["commit_url"].endswith(repo.branches["main"])
        pushes = repo.commits[1:]  # after the repository's initial commit
        during = [c.title for c in pushes if c.title.startswith("Training in progress")]
        assert during == ([] if strategy == "end" else ["Training in progress, step 2", "Training in progress, step 4"])
        assert pushes[-1].title == "End of training"
        allowed_folders = re.compile(r"^(last-checkpoint|checkpoint-\d+)/")
        for commit in pushes:
            root = {path for path in commit.files if "/" not in path}
            assert root <= STUDENT_FILES | {".gitattributes"}, (commit.title, root)
            assert {"config.json", "model.safetensors"} <= root, commit.title
            nested = {path for path in commit.files if "/" in path}
            assert all(allowed_folders.match(path) for path in nested), (commit.title, nested)
            assert not any(path.split("/")[-1] == "training_args.bin" for path in commit.files), commit.title
            assert teacher_weights not in commit.files.values(), commit.title

        files = hub.files(f"user/distilled-{strategy}")
        assert {path for path in files if "/" not in path} == STUDENT_FILES | {".gitattributes"}
        folders = {path.split("/")[0] for path in files if "/" in path}
        assert folders == CHECKPOINT_FOLDERS[strategy]
        for folder in folders:
            assert RESUMABLE <= {path.split("/", 1)[1] for path in files if path.startswith(f"{folder}/")}
        if folders:
            assert out["resumed_identical"] and out["resumed_steps"] == 5, out

        # The card of the bare push_to_hub(): loadable with transformers, the teacher by its Hub id, and the
        # measured accuracy in the model-index though no dataset was named.
        card = ModelCard(files["README.md"].decode())
        assert card.data.library_name == "transformers" and "hf_udkd" in card.data.tags
        assert card.data.teacher_model["hub_id"] == "user/teacher"
        results = {r.metric_type: r for r in card.data.eval_results}
        assert {"accuracy", "teacher_accuracy"} <= set(results)

    # Nothing on disk holds the token either: a pickled token would be found (the control), and none is.
    control = tmp_path / "control.bin"
    torch.save({"hub_token": STRATEGY_TOKEN}, control)
    assert STRATEGY_TOKEN.encode() in control.read_bytes()
    control.unlink()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]  # checkpoints, the Hub cache and the logs included
    assert any(p.name == "training_args.bin" for p in written)
    assert [p for p in written if STRATEGY_TOKEN.encode() in p.read_bytes()] == []
