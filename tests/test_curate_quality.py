import random

from curate_samples import write_jsonl
from test_curate_pipeline import c4_docs

from scratchlm.curate.config import CurateConfig
from scratchlm.curate.pipeline import run_curate
from scratchlm.curate.quality import QualityScorer, train_quality


def junk(rng: random.Random) -> str:
    parts = [
        "Home",
        "Login",
        "Cart",
        "Sale!!!",
        "Click here",
        "Menu",
        "Privacy",
        "$9.99",
        "Buy now",
    ]
    return " | ".join(rng.choice(parts) for _ in range(120))


def test_train_quality_separates_prose_from_boilerplate(tmp_path):
    rng = random.Random(0)
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in c4_docs(150)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": junk(rng)} for _ in range(150)])
    metrics = train_quality([str(good)], [str(bad)], tmp_path / "q.bin", epochs=5)
    assert metrics["accuracy"] >= 0.95
    assert metrics["n_valid"] > 20 and (tmp_path / "q.bin").is_file()
    scorer = QualityScorer(tmp_path / "q.bin")
    assert scorer(c4_docs(200)[-1]) > 0.5 > scorer(junk(rng))

    cfg = CurateConfig(steps=["normalize", "quality"], quality_model=str(tmp_path / "q.bin"))
    mix = write_jsonl(tmp_path / "mix.jsonl", [{"text": junk(rng)}, {"text": c4_docs(160)[-1]}])
    stats = run_curate([str(mix)], tmp_path / "out", cfg, progress=False)
    quality = stats["steps"][-1]
    assert (quality["step"], quality["docs_in"], quality["docs_out"]) == ("quality", 2, 1)
