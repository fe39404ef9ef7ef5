"""`UDKDTrainer.push_to_hub` against tests/hub_server.LocalHub, a Hub look-alike on 127.0.0.1.

huggingface_hub and transformers read HF_ENDPOINT / HF_TOKEN at import, so the client side (a short real
distillation, then the pushes) runs in ONE fresh subprocess; the server runs here, so the test also sees what it
stored. The subprocess first pushes while the server refuses every write (500), reports, waits until this
process lets the server recover, then pushes again and loads the student back from the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
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


def client_env(hub: LocalHub, hf_home: Path) -> dict[str, str]:
    """A client environment for ``hub``: its endpoint and token, a fresh HF_HOME, online."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=FAKE_TOKEN, HF_HOME=str(hf_home), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    return env


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
    train, validation = digits
    save_file({"train_x": train.pixel_values[:64].contiguous(), "train_y": train.labels[:64].contiguous(),
               "val_x": validation.pixel_values[:64].contiguous(), "val_y": validation.labels[:64].contiguous()},
              tmp_path / "digits.safetensors")
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
