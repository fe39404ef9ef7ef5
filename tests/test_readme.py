"""The README's notebook snippet runs as written, against a teacher where the first command leaves one."""

import re
from pathlib import Path

import pytest
from transformers import AutoModelForImageClassification, ResNetConfig, ViTImageProcessor

from hf_udkd.data import load_animal_mnist

README = Path(__file__).resolve().parent.parent / "README.md"


def notebook_snippet() -> str:
    text = README.read_text()
    marker = "tests/test_readme.py"
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.slow
def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    names = load_animal_mnist()["train"].features["label"].names
    config = ResNetConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], embedding_size=32,
                          num_labels=10, id2label=dict(enumerate(names)),
                          label2id={n: i for i, n in enumerate(names)})
    teacher_dir = tmp_path / "udkd-animal-mnist-teacher"
    AutoModelForImageClassification.from_config(config).save_pretrained(teacher_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(teacher_dir)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(notebook_snippet(), str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    metrics = trainer.evaluate()
    assert {"eval_accuracy", "eval_loss_ce", "eval_loss_logit", "eval_loss_feat", "eval_loss_supp"} <= set(metrics)
    # An untrained teacher still leaves the student's cross-entropy to learn from 1,000 real labels.
    assert metrics["eval_accuracy"] > 0.3
    saved = AutoModelForImageClassification.from_pretrained(tmp_path / "udkd-notebook")
    assert saved.config.id2label[0] == "bear"
