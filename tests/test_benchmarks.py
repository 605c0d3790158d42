"""The benchmarks' baselines compute the same losses as mmfast's float64 reference (an honest
baseline must be a correct one), and the benchmark CLI fills every column it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfast.reference import (
    contrastive_loss_reference,
    distillation_loss_reference,
    late_interaction_loss_reference,
    sigmoid_loss_reference,
)
from tests.helpers import unit_rows

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import contrastive_loss as contrastive_benchmark  # noqa: E402
import distillation_loss as distillation_benchmark  # noqa: E402
import gpu_report  # noqa: E402
import late_interaction_loss as late_interaction_benchmark  # noqa: E402
import late_interaction_topk as late_interaction_topk_benchmark  # noqa: E402
import sigmoid_loss as sigmoid_benchmark  # noqa: E402


def grads_of(loss, leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("option_name", list(contrastive_benchmark.OPTIONS) + ["everything"])
@pytest.mark.parametrize("k", [0, 2])
def test_naive_contrastive_baseline_matches_the_reference(option_name, k):
    options = {"hardness": 3.0, "symmetric": True, "false_negative_margin": 0.05, "topk": 4}
    options = options if option_name == "everything" else contrastive_benchmark.OPTIONS[option_name]
    learned = options.get("temperature") == "learned"  # the *_tau cases: a 0-d tensor τ that gets a gradient
    options = {key: value for key, value in options.items() if key != "temperature"}
    g = torch.Generator().manual_seed(7)
    b, d = 13, 7
    leaves = [unit_rows(b, d, generator=g).requires_grad_(), unit_rows(b, d, generator=g).requires_grad_()]
    if k:
        leaves.append(unit_rows(b * k, d, generator=g).requires_grad_())
    negatives = leaves[2] if k else None
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True) if learned else 0.1
    wrt = leaves + ([tau] if learned else [])
    ids = contrastive_benchmark.duplicate_ids(options, b, b * k)
    options = {key: value for key, value in options.items() if key != "ids"} | ids
    expected = contrastive_loss_reference(*leaves[:2], negatives, temperature=tau, **options)
    actual = contrastive_benchmark.naive_contrastive_loss(*leaves[:2], negatives, temperature=tau, **options)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(grads_of(actual, wrt), grads_of(expected, wrt), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("k", [0, 2])
def test_naive_sigmoid_baseline_matches_the_reference(k):
    g = torch.Generator().manual_seed(5)
    leaves = [unit_rows(9, 6, generator=g).requires_grad_(), unit_rows(9, 6, generator=g).requires_grad_()]
    negatives = unit_rows(9 * k, 6, generator=g).requires_grad_() if k else None
    parameters = [torch.tensor(4.0, dtype=torch.float64, requires_grad=True),
                  torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)]  # fmt: skip
    wrt = leaves + ([negatives] if k else []) + parameters
    expected = sigmoid_loss_reference(*leaves, negatives, logit_scale=parameters[0], logit_bias=parameters[1])
    actual = sigmoid_benchmark.naive_sigmoid_loss(*leaves, negatives, logit_scale=parameters[0],
                                                  logit_bias=parameters[1])  # fmt: skip
    torch.testing.assert_close(actual, expected)
    for got, want in zip(grads_of(actual, wrt), grads_of(expected, wrt), strict=True):
        torch.testing.assert_close(got, want)


def test_naive_distillation_baseline_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    student = [unit_rows(11, 5, generator=g).requires_grad_() for _ in range(2)]
    teacher = [unit_rows(11, 9, generator=g) for _ in range(2)]
    temperatures = dict(student_temperature=0.05, teacher_temperature=0.1)
    expected = distillation_loss_reference(*student, *teacher, **temperatures)
    actual = distillation_benchmark.naive_distillation_loss(*student, *teacher, **temperatures)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(grads_of(actual, student), grads_of(expected, student), strict=True):
        torch.testing.assert_close(got, want)


def test_gemm_flops_count_the_symmetric_block():
    assert contrastive_benchmark.gemm_flops({}, 4, 1, 3) == 3 * 2 * 4 * 8 * 3
    assert contrastive_benchmark.gemm_flops({"symmetric": True}, 4, 1, 3) == 3 * 2 * 4 * (8 + 4) * 3


def test_benchmark_table_prints_every_measured_column(capsys):
    argv = ["--batch", "64", "--negatives", "1", "--dim", "16", "--options", "plain", "llave", "--repeats", "1",
            "--providers", "mmfast", "naive", "reference", "gemm", "--quiet"]  # fmt: skip
    assert contrastive_benchmark.main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("options"))
    assert header.split()[5:] == ["fwd", "ms", "bwd", "ms", "fwd+bwd", "GFLOP/s", "÷gemm", "naive÷", "reference÷"]
    mmfast_rows = [line.split() for line in out.splitlines() if " mmfast " in line]
    assert len(mmfast_rows) == 2 and all("-" not in row for row in mmfast_rows)
    assert "{" not in out  # no raw JSON lines


def test_gpu_report_prices_every_path_and_says_what_auto_runs(tmp_path, capsys):
    """The cost-model part of benchmarks/gpu_report.py (the AOT part is tests/test_compile.py's)."""
    assert gpu_report.main(["--skip-compile", "--json", str(tmp_path / "report.json")]) == 0
    text = capsys.readouterr().out
    assert "auto runs: cublas" in text or "auto runs: chunked" in text
    report = json.loads((tmp_path / "report.json").read_text())
    for row in report["roofline"]:
        assert set(row["paths"]) == {"chunked", "cublas", "fused"} and row["auto"] in ("chunked", "cublas")
        assert row["paths"][row["fastest"]]["predicted_ms"] == min(p["predicted_ms"] for p in row["paths"].values())
        for path in row["paths"].values():
            assert path["predicted_ms"] > path["gemms_at_peak_ms"] > row["gemm_bound_at_peak_ms"]
    assert {row["D"] for row in report["fused_modes"]} > {512, 1024}
    late = report["late_interaction_roofline"]  # the fused forward dominates; the sparse backward is small
    assert {(row["B"], row["dtype"]) for row in late} == {(b, d) for b in (64, 256, 1024) for d in ("bf16", "fp32")}
    for row in late:
        backward = row["sort"] + row["grad_query"] + row["grad_documents"]
        assert 0 < backward < 0.1 * row["maxsim"] and row["total_ms"] > row["gemm_ms"] > 0


@pytest.mark.distributed
def test_cross_device_benchmark_counts_half_the_bytes_of_the_all_reduce(tmp_path):
    """Two gloo ranks, tiny: every row filled, the paper's ring bytes, and the all-to-all backward
    sending about half what the all-reduce did (the other rank's rows against the whole gradient)."""
    out = tmp_path / "cross_device.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "contrastive_loss_cross_device.py"
    subprocess.run([sys.executable, str(script), "--ranks", "2", "--batch", "16", "--dim", "64", "--repeats", "1",
                    "--json", str(out)], check=True, capture_output=True, timeout=300)  # fmt: skip
    rows = {(r["symmetric"], r["method"]): r for r in json.loads(out.read_text())["rows"] if "method" in r}
    assert len(rows) == 6
    for symmetric in (False, True):
        n = 2 * 16 * ((2 if symmetric else 1) + 1) * 64 * 4  # gathered rows × D × float32 bytes
        before, after = rows[symmetric, "all_reduce (before)"], rows[symmetric, "all_to_all_single (after, gloo)"]
        assert before["paper"] == {
            "forward_all_gather": n / 2,
            "backward_all_reduce": n,
            "backward_reduce_scatter": n / 2,
        }
        assert n <= before["backward_sent_bytes_per_rank_max"] < n + 2048
        assert n / 2 <= after["backward_sent_bytes_per_rank_max"] < n / 2 + 2048
        assert all(r["step_ms_rank0"] > 0 for r in rows.values())


def test_report_tabulates_every_results_file(capsys):
    """benchmarks/report.py turns every committed results file into a table (the README's source):
    one section per run, and no table without its rows."""
    import report

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    assert report.main([str(results)]) == 0
    out = capsys.readouterr().out
    for path in results.glob("*.json"):
        data = json.loads(path.read_text())
        if path.name.startswith("gpu_report"):
            continue
        heading = f"### {path.stem}"
        sections = [line for line in out.splitlines() if line == heading or line.startswith(heading + " (")]
        assert len(sections) == len(report.runs(data)) >= 1, path.name
    tables = out.split("\n### ")
    assert all(section.count("\n|") >= 3 for section in tables[1:]), "a section without rows"


def test_colpali_baseline_matches_the_reference(monkeypatch):
    """The benchmark's colpali provider is colpali-engine's own ColbertLoss (its pinned copy), and it
    computes what the float64 oracle does."""
    monkeypatch.setenv("COLPALI_SCORES_BACKEND", "torch")  # restored after; the benchmark sets it too
    query, document = late_interaction_benchmark.make_inputs(5, 4, 7, 6)
    leaves = [query.double().requires_grad_(), document.double().requires_grad_()]
    colpali = late_interaction_benchmark.colpali_loss(temperature=0.1)
    assert type(colpali).__module__ == "colpali_engine.loss.late_interaction_losses"
    actual = colpali(*leaves)
    expected = late_interaction_loss_reference(*leaves, temperature=0.1)
    torch.testing.assert_close(actual, expected)
    for got, want in zip(grads_of(actual, leaves), grads_of(expected, leaves), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_late_interaction_benchmark_records_running_out_of_memory_under_its_cap(tmp_path):
    """Every measuring process runs under --memory-cap-gib (RLIMIT_AS): colpali-engine's einsum at
    B = 512, L_d = 1,030 (32 GiB) cannot allocate under 4 GiB, and that failure is its row's result (with
    what it asked for and where), not a crash or a skip; mmfast runs under the same cap."""
    out = tmp_path / "late.json"
    argv = ["--cases", "8x64:mmfast", "512x1030:colpali", "--memory-cap-gib", "4", "--json", str(out)]
    assert late_interaction_benchmark.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["command"] == "python benchmarks/late_interaction_loss.py " + " ".join(argv)
    mmfast_row, colpali_row = data["rows"]
    assert mmfast_row["provider"] == "mmfast" and mmfast_row["extra_peak_mib"] is not None and mmfast_row["ms"] > 0
    assert mmfast_row["process_peak_mib"] < 4 * 1024
    assert colpali_row["provider"] == "colpali" and colpali_row["cap_gib"] == 4 and "ms" not in colpali_row
    assert colpali_row["phase"] == "forward" and colpali_row["asked_bytes"] >= 4 * 512 * 512 * 32 * 1030
    assert colpali_row["out_of_memory"].startswith("the forward tried to allocate")


def test_colpali_search_baseline_matches_the_reference():
    """The search benchmark's colpali-engine way (batched einsum, batches smaller than the sets here)
    scores as the float64 oracle does."""
    from mmfast.reference.late_interaction_topk import late_interaction_topk_reference

    query, corpus, _ = late_interaction_topk_benchmark.make_inputs(7, 9, 3, 5, 4)
    query, corpus = query.double(), corpus.double()
    scores = late_interaction_topk_benchmark.colpali_scores(query, corpus, batch=4)
    values, indices, _ = late_interaction_topk_reference(query, corpus, 9)
    torch.testing.assert_close(scores.gather(1, indices), values)
