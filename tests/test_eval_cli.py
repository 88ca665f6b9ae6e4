"""`scratchlm eval` as a user runs it: tasks on a run's checkpoint, result files, bad input."""

import json

import pytest
from test_pretrain import TINY, make_corpus_run

from scratchlm import cli
from scratchlm.config import load_recipe
from scratchlm.errors import UserError
from scratchlm.evaluate.run import in_loop_metrics, run_tasks
from scratchlm.loading import load
from scratchlm.report import write_report
from scratchlm.train.metrics import read_metrics
from scratchlm.train.pretrain import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evalrun")
    tasks = ["pretrain.max_steps=2", "pretrain.eval_tasks=['copa']", "pretrain.eval_tasks_limit=4"]
    recipe = make_corpus_run(run_dir, tasks)
    pretrain(recipe, run_dir, progress=False)
    return run_dir


def eval_cli(capsys, *args):
    code = cli.main(["eval", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_tasks_on_a_run_write_results_and_end_with_json(run, capsys):
    code, out, err = eval_cli(
        capsys, str(run), "--tasks", "arc_easy,copa", "--limit", "6", "--json"
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 2 and list(summary["tasks"]) == ["arc_easy", "copa"]
    arc = summary["tasks"]["arc_easy"]
    assert arc["n"] == 6 and 0 <= arc["acc"] <= 1 and arc["acc_stderr"] >= 0
    assert arc["chance"] == pytest.approx(0.25, abs=0.01) and summary["tasks"]["copa"]["n"] == 6
    assert "arc_easy" in out and "acc_norm" in out  # the printed table
    # --limit 6 is not the run's [eval] limit (200): its own file, not the pipeline's results
    results = json.loads((run / "eval/pretrain-step-000002.limit-6.json").read_text())
    assert results["settings_key"] == "limit-6" and results["settings"]["limit"] == 6
    assert results["tasks"]["copa"]["acc"] == summary["tasks"]["copa"]["acc"]
    assert "eval: -> " in out and "limit-6; not in the report" in out


def test_the_stage_keeps_validation_and_samples_and_later_tasks_merge(run, capsys):
    code, _, err = eval_cli(
        capsys, "--run-dir", str(run), "--set", "eval.tasks=['piqa']", "--set", "eval.limit=4"
    )
    assert code == 0, err
    results = json.loads((run / "eval/results.json").read_text())
    assert results["val_bpb"] > 0 and results["samples"]
    assert results["tasks"]["piqa"]["n"] == 4
    code, _, err = eval_cli(capsys, str(run), "--tasks", "lambada", "--limit", "4")
    assert code == 0, err
    merged = json.loads((run / "eval/results.json").read_text())
    assert merged["val_bpb"] == results["val_bpb"] and merged["samples"] == results["samples"]
    assert set(merged["tasks"]) >= {"piqa", "lambada"}
    assert merged["tasks"]["lambada"]["perplexity"] > 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "hellaswag,nope"], "unknown task 'nope'"),
        (["--tasks", "arc_easy", "--data", "missing.jsonl"], "evaluation data not found"),
        (
            ["--tasks", "arc_easy", "--data", "data/eval/piqa_validation.jsonl.gz"],
            "record 1 has no question",
        ),
        (
            ["--tasks", "arc_easy,copa", "--data", "data/eval/copa_validation.jsonl.gz"],
            "exactly one",
        ),
        (["--tasks", "mmlu", "--shots", "6"], "6-shot needs 6 examples"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, capsys, args, message):
    code, _, err = eval_cli(capsys, str(run), *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_harness_through_the_cli_gives_the_in_house_numbers(run, capsys):
    pytest.importorskip("lm_eval")
    args = ["--tasks", "boolq", "--limit", "5", "--json"]
    code, out, err = eval_cli(capsys, str(run / "pretrain" / "step-000002"), *args)
    assert code == 0, err
    ours = json.loads(out.strip().splitlines()[-1])["tasks"]["boolq"]
    code, out, err = eval_cli(capsys, str(run), *args, "--harness")
    assert code == 0, err
    theirs = json.loads(out.strip().splitlines()[-1])["tasks"]["boolq"]
    assert theirs["n"] == 5 and theirs["acc"] == pytest.approx(ours["acc"])
    saved = json.loads((run / "eval/pretrain-step-000002.limit-5.json").read_text())
    assert saved["harness"]["boolq"]["n"] == 5


def test_run_tasks_for_the_training_loop(run):
    model, tokenizer = load(run)
    model.train()
    results = run_tasks(model, tokenizer, ["hellaswag", "blimp"], limit=3, batch_size=4)
    assert model.training  # left as it came
    assert results["hellaswag"]["n"] == 3 and results["blimp"]["n"] == 3 * 67
    assert set(results["blimp"]["subtasks"]) >= {"adjunct_island", "wh_island"}
    flat = in_loop_metrics(results)
    assert set(flat) == {"eval/hellaswag/acc", "eval/hellaswag/acc_norm", "eval/blimp/acc"}


def test_pretraining_scores_its_eval_tasks_into_the_metrics(run, tmp_path):
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "val_bpb" in r]
    assert rows and all(0 <= r["eval/copa/acc"] <= 1 for r in rows)
    recipe = load_recipe(None, [*TINY, "pretrain.eval_tasks=['copa', 'nope']"])
    with pytest.raises(UserError, match="unknown task 'nope'"):
        pretrain(recipe, run, progress=False)


def test_an_evaluation_with_other_settings_leaves_the_pipelines_scores(run, capsys):
    stage = ["--run-dir", str(run), "--set", "eval.tasks=['copa']", "--set", "eval.limit=8"]
    assert eval_cli(capsys, *stage)[0] == 0
    pipeline_file = run / "eval/pretrain-step-000002.json"
    before = {p: p.read_bytes() for p in (pipeline_file, run / "eval/results.json")}
    assert json.loads(pipeline_file.read_bytes())["tasks"]["copa"]["n"] == 8
    for extra in (["--limit", "3"], ["--limit", "3", "--shots", "0"], ["--chat"]):
        code, _, err = eval_cli(capsys, str(run), "--tasks", "copa", *extra)
        assert code == 0, err
    assert {p: p.read_bytes() for p in before} == before
    keyed = json.loads((run / "eval/pretrain-step-000002.limit-3.shots-0.json").read_text())
    assert keyed["tasks"]["copa"]["n"] == 3 and keyed["settings"]["shots"] == 0
    assert (run / "eval/pretrain-step-000002.chat-on.json").is_file()
    # the same settings as the run's [eval] merge into its file
    assert eval_cli(capsys, str(run), "--tasks", "arc_easy", "--limit", "8")[0] == 0
    assert set(json.loads(pipeline_file.read_bytes())["tasks"]) == {"copa", "arc_easy"}


def test_report_shows_task_tables_and_in_loop_scores(run, capsys):
    stage = ["--run-dir", str(run), "--set", "eval.tasks=['arc_easy']", "--set", "eval.limit=3"]
    code, _, err = eval_cli(capsys, *stage)
    assert code == 0, err
    assert eval_cli(capsys, str(run), "--tasks", "arc_easy", "--limit", "2")[0] == 0
    with open(run / "metrics.jsonl", "a") as f:
        for step, score in [(1, 0.25), (2, 0.5)]:
            f.write(json.dumps({"stage": "pretrain", "step": step, "eval/hellaswag/acc": score}))
            f.write("\n")
    report = write_report(load_recipe(None, TINY), run).read_text()
    assert "Benchmarks" in report and "pretrain step 2 (scratchlm; limit 3, shots task" in report
    assert "<td>arc_easy</td><td>acc_norm</td>" in report
    assert "<td>2</td>" not in report  # the --limit 2 evaluation is not the pipeline's
    assert "<tr><th>evaluation settings</th><td>limit 3, shots task defaults, data_dir " in report
    assert "task scores over steps" in report
