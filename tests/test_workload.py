"""Tests for sim.workload: synthetic generators, trace readers, errors and conf/workload."""

from __future__ import annotations

import csv
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sim.errors import InputError
from sim.paths import PROJECT_ROOT
from sim.workload import COLUMNS, ArrivalProcess, Workload, from_trace, make_requests, synthetic, trace_workload

TRACES = PROJECT_ROOT.parent / "shared" / "traces"
AZURE_CONV = TRACES / "AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = TRACES / "AzureLLMInferenceTrace_code.csv"
needs_traces = pytest.mark.skipif(not AZURE_CONV.exists() or not AZURE_CODE.exists(), reason=f"Azure traces not found in {TRACES}")
CONF = PROJECT_ROOT / "conf" / "workload"

CONST = {"kind": "constant", "value": 8}
POISSON_2 = {"kind": "poisson", "rate_qps": 2.0}


def make(**overrides) -> Workload:
    args = dict(num_requests=200, arrival=POISSON_2, prompt_tokens=CONST, output_tokens=CONST)
    args.update(overrides)
    return synthetic(**args)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ synthetic


def test_same_seed_gives_identical_table_and_another_seed_does_not():
    args = dict(
        num_requests=500,
        arrival={"kind": "gamma", "rate_qps": 3.0, "cv": 2.0},
        prompt_tokens={"kind": "lognormal", "median": 500, "sigma": 1.0, "max": 4096},
        output_tokens={"kind": "lognormal", "median": 100, "sigma": 0.8},
        qos_shares={"interactive": 0.5, "batch": 0.5},
    )
    first, again, other = synthetic(seed=7, **args), synthetic(seed=7, **args), synthetic(seed=8, **args)
    pd.testing.assert_frame_equal(first.requests, again.requests)
    assert first.source == again.source
    for column in ("arrival_s", "num_prompt_tokens", "num_output_tokens", "qos_class"):
        assert not first.requests[column].equals(other.requests[column]), column


def test_schema_matches_the_contract():
    workload = make(model="llama-3-8b", qos_shares={"a": 1.0})
    df = workload.requests
    assert tuple(df.columns) == COLUMNS
    for name in ("request_id", "num_prompt_tokens", "num_output_tokens"):
        assert df[name].dtype == np.int64
    assert df["arrival_s"].dtype == np.float64
    assert pd.api.types.is_string_dtype(df["model"]) and pd.api.types.is_string_dtype(df["qos_class"])
    assert df["request_id"].tolist() == list(range(200))
    assert (np.diff(df["arrival_s"]) >= 0).all() and df["arrival_s"].iloc[0] >= 0
    assert set(df["model"]) == {"llama-3-8b"} and set(df["qos_class"]) == {"a"}
    assert workload.num_filtered == {}
    assert workload.source == "synthetic(poisson, 2 qps, seed=0)"
    assert set(make().requests["qos_class"]) == {"default"}
    assert set(make().requests["model"]) == {""}


def test_poisson_arrivals_have_the_configured_rate_and_exponential_gaps():
    n, rate = 20_000, 2.0
    arrival = make(num_requests=n, arrival={"kind": "poisson", "rate_qps": rate}).requests["arrival_s"].to_numpy()
    # the n-th arrival is a sum of n Exp(rate) gaps: mean n/rate, sd sqrt(n)/rate
    assert abs(arrival[-1] - n / rate) < 3 * math.sqrt(n) / rate
    gaps = np.diff(arrival)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.04)  # se of the CV ~ sqrt(2/n) = 0.01


def test_gamma_arrivals_have_the_configured_cv_and_rate():
    n, rate, cv = 20_000, 2.0, 3.0
    arrival = make(num_requests=n, arrival={"kind": "gamma", "rate_qps": rate, "cv": cv}).requests["arrival_s"].to_numpy()
    gaps = np.diff(arrival)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)  # se ~3% for shape 1/9 gaps
    assert abs(arrival[-1] - n / rate) < 3 * cv * math.sqrt(n) / rate


def test_piecewise_schedule_counts_per_segment_match_the_rates():
    workload = make(
        num_requests=None,
        duration_s=4 * 3600,
        arrival={"kind": "poisson", "schedule": [[900, 2.0], [900, 5.0]], "repeat": True},
    )
    arrival = workload.requests["arrival_s"].to_numpy()
    assert arrival[-1] < 4 * 3600
    counts = np.bincount((arrival // 900).astype(int), minlength=16)
    assert len(counts) == 16
    expected = np.where(np.arange(16) % 2 == 0, 2.0 * 900, 5.0 * 900)
    assert (np.abs(counts - expected) < 4 * np.sqrt(expected)).all(), counts
    for parity, rate in ((0, 2.0), (1, 5.0)):  # the 8 segments at one rate together
        total, mean = counts[parity::2].sum(), 8 * 900 * rate
        assert abs(total - mean) < 3 * math.sqrt(mean)


def test_gamma_schedule_keeps_the_cv_within_each_segment():
    workload = make(
        num_requests=None,
        duration_s=20_000,
        arrival={"kind": "gamma", "cv": 2.0, "schedule": [[1000, 1.0], [1000, 4.0]], "repeat": True},
    )
    arrival = workload.requests["arrival_s"].to_numpy()
    segment = (arrival // 1000).astype(int)
    fast = segment % 2 == 1
    gaps = np.diff(arrival)[(segment[1:] == segment[:-1]) & fast[1:]]  # gaps inside the 4-qps segments
    assert gaps.mean() == pytest.approx(1 / 4.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15)


def test_schedule_without_repeat_ends_by_itself():
    workload = make(num_requests=None, arrival={"kind": "poisson", "schedule": [[100, 1.0], [50, 20.0]]})
    arrival = workload.requests["arrival_s"].to_numpy()
    assert arrival[-1] < 150
    assert abs((arrival >= 100).sum() - 1000) < 4 * math.sqrt(1000)
    with pytest.raises(InputError, match="num_requests"):
        make(arrival={"kind": "poisson", "schedule": [[100, 1.0]]})


def test_arrival_process_inverts_its_cumulative_rate():
    process = ArrivalProcess(kind="poisson", schedule=((10.0, 1.0), (5.0, 4.0)), repeat=True)
    times = np.array([0.0, 3.0, 10.0, 12.5, 15.0, 31.0])
    expected = np.array([process.expected_arrivals(t) for t in times])
    assert expected.tolist() == [0.0, 3.0, 10.0, 20.0, 30.0, 61.0]
    assert process.time_at(expected) == pytest.approx(times)


def test_lognormal_lengths_have_the_configured_median_and_bounds():
    n = 20_000
    lengths = {"kind": "lognormal", "median": 1020, "sigma": 1.0, "min": 4, "max": 8192}
    df = make(num_requests=n, prompt_tokens=lengths).requests
    prompt = df["num_prompt_tokens"].to_numpy()
    # the sample median of log X has se 1.2533 * sigma / sqrt(n) = 0.009
    assert abs(math.log(np.median(prompt)) - math.log(1020)) < 3 * 1.2533 / math.sqrt(n)
    assert prompt.min() >= 4 and prompt.max() <= 8192
    assert prompt.max() == 8192  # P(X > 8192) = 1.9%: the clip is reached
    assert (df["num_output_tokens"] == 8).all()


def test_empirical_lengths_resample_the_column(tmp_path):
    source = write(tmp_path, "lengths.csv", "ContextTokens,Other\n5,x\n70,y\n900,z\n")
    df = make(num_requests=3000, prompt_tokens={"kind": "empirical", "path": str(source), "column": "ContextTokens"}).requests
    counts = df["num_prompt_tokens"].value_counts()
    assert set(counts.index) == {5, 70, 900}
    assert (np.abs(counts.to_numpy() - 1000) < 4 * math.sqrt(3000 * (1 / 3) * (2 / 3))).all()


def test_qos_shares_are_drawn_in_proportion_and_normalised():
    n = 20_000
    df = make(num_requests=n, qos_shares={"interactive": 0.7, "batch": 0.3}).requests
    share = (df["qos_class"] == "interactive").mean()
    assert abs(share - 0.7) < 3 * math.sqrt(0.7 * 0.3 / n)
    unnormalised = make(num_requests=n, qos_shares={"interactive": 7, "batch": 3}).requests
    pd.testing.assert_frame_equal(df, unnormalised)


CONV_LENGTHS = dict(  # the Azure conv fits of conf/workload/chat.yaml: P(prompt + output > 8192) = 0.84%
    prompt_tokens={"kind": "lognormal", "median": 760, "sigma": 0.985, "max": 14050},
    output_tokens={"kind": "lognormal", "median": 151, "sigma": 0.859, "max": 1000},
)


def test_lengths_over_the_context_are_redrawn_and_counted():
    free = make(num_requests=5000, qos_shares={"a": 1, "b": 1}, **CONV_LENGTHS).requests
    over = (free["num_prompt_tokens"] + free["num_output_tokens"] > 8192).to_numpy()
    fitted = make(num_requests=5000, qos_shares={"a": 1, "b": 1}, max_total_tokens=8192, **CONV_LENGTHS)
    df = fitted.requests
    assert over.sum() > 0
    assert fitted.num_adjusted == {"redrawn_over_max_total_tokens": int(over.sum())}
    assert fitted.summary()["num_adjusted"] == fitted.num_adjusted
    assert (df["num_prompt_tokens"] + df["num_output_tokens"] <= 8192).all()
    pd.testing.assert_frame_equal(df[~over], free[~over])  # requests that fitted keep their draws
    assert df["arrival_s"].equals(free["arrival_s"]) and df["qos_class"].equals(free["qos_class"])
    again = make(num_requests=5000, qos_shares={"a": 1, "b": 1}, max_total_tokens=8192, **CONV_LENGTHS).requests
    pd.testing.assert_frame_equal(df, again)  # redraws are seeded too


def test_lengths_over_the_context_can_be_truncated_instead():
    free = make(num_requests=5000, **CONV_LENGTHS).requests
    cut = make(num_requests=5000, max_total_tokens=8192, too_long="truncate", **CONV_LENGTHS)
    prompt = np.minimum(free["num_prompt_tokens"], 8192 - 1)  # room for the smallest output (1 token)
    output = np.minimum(free["num_output_tokens"], 8192 - prompt)
    assert cut.requests["num_prompt_tokens"].tolist() == prompt.tolist()
    assert cut.requests["num_output_tokens"].tolist() == output.tolist()
    num_over = int((free["num_prompt_tokens"] + free["num_output_tokens"] > 8192).sum())
    assert num_over > 0 and cut.num_adjusted == {"truncated_over_max_total_tokens": num_over}


def test_lengths_that_cannot_fit_the_context_are_errors():
    at_least = {"kind": "lognormal", "median": 6000, "sigma": 0.5, "min": 5000}
    with pytest.raises(InputError, match=r"max_total_tokens.*8192.*5000 \+ 5000"):
        make(prompt_tokens=at_least, output_tokens=at_least, max_total_tokens=8192)
    with pytest.raises(InputError, match="still longer after 100 redraws"):  # constants never change
        make(prompt_tokens={"kind": "constant", "value": 8}, max_total_tokens=12)
    assert make(prompt_tokens={"kind": "constant", "value": 8}, max_total_tokens=16).num_adjusted == {}


def test_changing_one_stream_leaves_the_others_alone():
    base = make(num_requests=1000, prompt_tokens={"kind": "lognormal", "median": 100, "sigma": 1.0}).requests
    other = make(
        num_requests=1000,
        prompt_tokens={"kind": "lognormal", "median": 100, "sigma": 1.0},
        qos_shares={"a": 1, "b": 1},
        output_tokens={"kind": "constant", "value": 3},
    ).requests
    assert base["arrival_s"].equals(other["arrival_s"])
    assert base["num_prompt_tokens"].equals(other["num_prompt_tokens"])


@pytest.mark.parametrize(
    ("overrides", "field", "value"),
    [
        ({"arrival": {"kind": "poisson", "rate_qps": 0}}, "arrival.rate_qps", "0"),
        ({"arrival": {"kind": "poisson", "rate_qps": -1.5}}, "arrival.rate_qps", "-1.5"),
        ({"arrival": {"kind": "gamma", "rate_qps": 1, "cv": 0}}, "arrival.cv", "0"),
        ({"arrival": {"kind": "gamma", "rate_qps": 1}}, "arrival.cv", "gamma"),
        ({"arrival": {"kind": "poisson", "rate_qps": 1, "cv": 2}}, "arrival.cv", "2"),
        ({"arrival": {"kind": "weibull", "rate_qps": 1}}, "arrival.kind", "weibull"),
        ({"arrival": {"kind": "poisson", "rate": 1}}, "arrival", "rate"),
        ({"arrival": {"kind": "poisson", "schedule": [[900, 2.0], [0, 5.0]], "repeat": True}}, "arrival.schedule[1].duration_s", "0"),
        ({"num_requests": None}, "num_requests/duration_s", "None"),
        ({"duration_s": 10.0}, "num_requests/duration_s", "10.0"),
        ({"num_requests": 0}, "num_requests", "0"),
        ({"num_requests": 2.5}, "num_requests", "2.5"),
        ({"prompt_tokens": {"kind": "zipf"}}, "prompt_tokens.kind", "zipf"),
        ({"prompt_tokens": {"kind": "lognormal", "median": 100, "sigma": -1}}, "prompt_tokens.sigma", "-1"),
        ({"prompt_tokens": {"kind": "lognormal", "median": 100}}, "prompt_tokens.sigma", "lognormal"),
        ({"output_tokens": {"kind": "lognormal", "median": 100, "sigma": 1, "min": 50, "max": 10}}, "output_tokens.max", "10"),
        ({"output_tokens": {"kind": "constant", "value": 0}}, "output_tokens.value", "0"),
        ({"output_tokens": {"kind": "constant", "value": 5, "sigma": 1}}, "output_tokens", "sigma"),
        ({"qos_shares": {}}, "qos_shares", "{}"),
        ({"qos_shares": {"a": 1, "b": -0.5}}, "qos_shares.b", "-0.5"),
        ({"seed": -1}, "seed", "-1"),
        ({"max_total_tokens": 1}, "max_total_tokens", "1"),
        ({"too_long": "clip"}, "too_long", "clip"),
    ],
)
def test_bad_synthetic_arguments_name_the_field_and_value(overrides, field, value):
    with pytest.raises(InputError) as caught:
        make(**overrides)
    message = str(caught.value)
    assert field in message and value in message, message


def test_summary_reports_counts_rate_and_lengths():
    requests = make_requests(np.array([0.0, 1.0, 3.0]), np.array([10, 20, 30]), np.array([1, 2, 3]), "m", np.array(["a", "b", "a"], dtype=object))
    summary = Workload(requests, "hand-made", {"max_requests": 4}).summary()
    assert summary["num_requests"] == 3 and summary["duration_s"] == 3.0
    assert summary["mean_qps"] == pytest.approx(2 / 3)
    assert summary["num_prompt_tokens"]["p50"] == 20 and summary["num_output_tokens"]["max"] == 3
    assert summary["num_requests_by_qos_class"] == {"a": 2, "b": 1}
    assert summary["num_filtered"] == {"max_requests": 4}


def test_workload_rejects_tables_that_break_the_contract():
    good = make_requests(np.array([0.0, 1.0]), np.array([1, 2]), np.array([1, 2]), "", "default")
    with pytest.raises(InputError, match="arrival_s"):
        Workload(good.assign(arrival_s=[1.0, 0.5]), "x")
    with pytest.raises(InputError, match="num_prompt_tokens"):
        Workload(good.assign(num_prompt_tokens=np.array([0, 2], dtype=np.int64)), "x")
    with pytest.raises(InputError, match="columns"):
        Workload(good.drop(columns="model"), "x")


# ------------------------------------------------------------------ trace formats


def test_azure_2023_trace_parses_exact_values(tmp_path):
    path = write(
        tmp_path,
        "azure.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
        "2023-11-16 18:17:04.0319600,3180,8\n"
        "2023-11-16 18:18:05.5000001,7,1\n",
    )
    workload = from_trace(str(path))
    df = workload.requests
    assert df["arrival_s"].to_numpy() == pytest.approx([0.0, 0.052, 61.5200401], abs=1e-9)
    assert df["num_prompt_tokens"].tolist() == [4808, 3180, 7]
    assert df["num_output_tokens"].tolist() == [10, 8, 1]
    assert set(df["model"]) == {""} and set(df["qos_class"]) == {"default"}
    assert workload.source == f"azure:{path}" and workload.num_filtered == {}


def test_azure_2024_style_timestamps_parse(tmp_path):
    path = write(
        tmp_path,
        "azure2024.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:00.009930+00:00,100,5\n"
        "2024-05-10 00:00:01.5+00:00,200,6\n"
        "2024-05-10 00:00:02+00:00,300,7\n"
        "2024-05-10 00:00:03.123456,400,8\n",
    )
    df = from_trace(str(path), format="azure").requests
    assert df["arrival_s"].to_numpy() == pytest.approx([0.0, 1.49007, 1.99007, 3.113526], abs=1e-9)


def test_non_iso_timestamps_fall_back_to_per_value_parsing(tmp_path):
    path = tmp_path / "windows.csv"
    path.write_bytes(
        b"TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        b"2023-11-16 18:17:03.9799600,4808,10\r\n"
        b"2023/11/16 18:17:04.5,3180,8\r\n"
        b"11/16/2023 18:17:05,3180,8\r\n"
    )
    df = from_trace(str(path)).requests
    assert df["arrival_s"].to_numpy() == pytest.approx([0.0, 0.52004, 1.02004], abs=1e-9)


ZERO_ROWS = {  # one servable request at t = 2 s after rows of 0 output, 0 prompt and 0/0 tokens
    "azure.csv": "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.0,5,0\n2023-11-16 18:00:01.0,0,7\n"
                 "2023-11-16 18:00:01.5,0,0\n2023-11-16 18:00:02.0,40,9\n",
    "burst.csv": "Timestamp,Model,Request tokens,Response tokens\n10,m,5,0\n11,m,0,7\n11.5,m,0,0\n12,m,40,9\n",
    "mooncake.jsonl": '{"timestamp": 5000, "input_length": 5, "output_length": 0}\n'
                      '{"timestamp": 6000, "input_length": 0, "output_length": 7}\n'
                      '{"timestamp": 6500, "input_length": 0, "output_length": 0}\n'
                      '{"timestamp": 7000, "input_length": 40, "output_length": 9}\n',
    "plain.csv": "arrival_s,num_prompt_tokens,num_output_tokens\n0,5,0\n1,0,7\n1.5,0,0\n2,40,9\n",
}


@pytest.mark.parametrize("name", sorted(ZERO_ROWS))
def test_every_format_leaves_out_and_counts_zero_token_rows(tmp_path, name):
    path = write(tmp_path, name, ZERO_ROWS[name])
    workload = from_trace(str(path))
    df = workload.requests
    assert df[["num_prompt_tokens", "num_output_tokens"]].values.tolist() == [[40, 9]]
    assert df["arrival_s"].tolist() == [2.0]  # the clock still starts at the file's first row
    assert workload.num_filtered == {"zero_output_tokens": 2, "zero_prompt_tokens": 1}
    assert workload.summary()["num_filtered"] == workload.num_filtered
    assert workload.source_lines.tolist() == [5 if name != "mooncake.jsonl" else 4]  # the header is line 1


def test_a_trace_of_zero_token_rows_only_is_an_error(tmp_path):
    path = write(tmp_path, "zeros.csv", CSV_HEADER + "0,5,0\n1,0,3\n")
    with pytest.raises(InputError, match="no servable request.*zero_output_tokens.*zero_prompt_tokens"):
        from_trace(str(path))


def test_burstgpt_drops_and_counts_failed_requests(tmp_path):
    path = write(
        tmp_path,
        "burst.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,0,1087,Conversation log\n"
        "118.5,GPT-4,417,276,693,API log\n"
        "118.5,ChatGPT,0,0,0,API log\n",
    )
    workload = from_trace(str(path))
    df = workload.requests
    assert workload.source.startswith("burstgpt:")
    assert df["arrival_s"].tolist() == [0.0, 113.5]
    assert df["model"].tolist() == ["ChatGPT", "GPT-4"]
    assert df["num_prompt_tokens"].tolist() == [472, 417] and df["num_output_tokens"].tolist() == [18, 276]
    assert workload.num_filtered == {"zero_output_tokens": 2}


def test_mooncake_jsonl_parses_ms_timestamps(tmp_path):
    path = write(
        tmp_path,
        "mooncake.jsonl",
        '{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]}\n'
        '{"timestamp": 30535, "input_length": 6472, "output_length": 26, "hash_ids": [46, 52]}\n'
        "\n"
        '{"timestamp": 30535, "input_length": 1, "output_length": 1, "hash_ids": []}\n',
    )
    workload = from_trace(str(path))
    df = workload.requests
    assert workload.source.startswith("mooncake:")
    assert df["arrival_s"].tolist() == pytest.approx([0.0, 3.053, 3.053])
    assert df["num_prompt_tokens"].tolist() == [6955, 6472, 1]
    assert df["num_output_tokens"].tolist() == [52, 26, 1]
    assert workload.num_filtered == {"blank_lines": 1}


def test_plain_csv_keeps_times_models_and_classes(tmp_path):
    path = write(
        tmp_path,
        "plain.csv",
        "arrival_s,num_prompt_tokens,num_output_tokens,model,qos_class\n"
        "0.5,10,3,llama,interactive\n"
        "0.5,20,4,mistral,\n"
        "2.25,30,5,llama,batch\n",
    )
    df = from_trace(str(path), qos_shares={"tier2": 1.0}).requests
    assert df["arrival_s"].tolist() == [0.5, 0.5, 2.25]  # a plain CSV's clock is kept as written
    assert df["model"].tolist() == ["llama", "mistral", "llama"]
    assert df["qos_class"].tolist() == ["interactive", "tier2", "batch"]
    assert from_trace(str(path)).requests["qos_class"].tolist() == ["interactive", "default", "batch"]


def test_a_class_without_objectives_is_an_error_naming_file_line_and_the_known_classes(tmp_path):
    path = write(tmp_path, "classes.csv", "arrival_s,num_prompt_tokens,num_output_tokens,qos_class\n"
                 "0,5,0,gold\n0.5,10,3,interactive\n1,10,3,gold\n2,10,3,gold\n")
    workload = from_trace(str(path))  # line 2 is left out (0 output tokens): line 4 is the first 'gold' kept
    workload.check_qos_classes({"interactive", "gold"})
    workload.check_qos_classes(set())  # no classes: nothing to account, nothing to check
    with pytest.raises(InputError) as caught:
        workload.check_qos_classes({"interactive", "batch"})
    error = caught.value
    assert (error.path, error.line, error.field, error.value) == (str(path), 4, "qos_class", "gold")
    assert "2 request(s)" in str(error) and "['batch', 'interactive']" in str(error)
    with pytest.raises(InputError, match=r"qos_shares.*'a'.*known classes: \['tier0'\]"):
        make(qos_shares={"a": 1}).check_qos_classes({"tier0"})


@pytest.fixture
def ten_requests(tmp_path) -> Path:
    rows = "".join(f"{t},{100 + t},{1 + t}\n" for t in range(10))
    return write(tmp_path, "ten.csv", "arrival_s,num_prompt_tokens,num_output_tokens\n" + rows)


def test_window_keeps_start_to_end_and_rebases(ten_requests):
    workload = from_trace(str(ten_requests), window_s=(2, 7))
    df = workload.requests
    assert df["arrival_s"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert df["num_prompt_tokens"].tolist() == [102, 103, 104, 105, 106]
    assert workload.num_filtered == {"before_window": 2, "after_window": 3}
    open_ended = from_trace(str(ten_requests), window_s=[8, None])
    assert open_ended.requests["num_prompt_tokens"].tolist() == [108, 109]
    assert open_ended.num_filtered == {"before_window": 8}


def test_max_requests_and_target_qps(ten_requests):
    workload = from_trace(str(ten_requests), window_s=(1, 100), max_requests=4, target_qps=2.0)
    df = workload.requests
    assert df["num_prompt_tokens"].tolist() == [101, 102, 103, 104]
    assert workload.num_filtered == {"before_window": 1, "max_requests": 5}
    arrival = df["arrival_s"].to_numpy()
    assert (len(arrival) - 1) / (arrival[-1] - arrival[0]) == pytest.approx(2.0)
    assert arrival.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])  # uniform stretch of the window's clock


def test_filters_that_leave_nothing_are_an_error(ten_requests):
    with pytest.raises(InputError, match="window_s"):
        from_trace(str(ten_requests), window_s=(50, 60))
    with pytest.raises(InputError, match="target_qps"):
        from_trace(str(ten_requests), max_requests=1, target_qps=1.0)
    with pytest.raises(InputError, match="window_s"):
        from_trace(str(ten_requests), window_s=(5, 2))


def test_trace_qos_shares_are_seeded(ten_requests):
    first = from_trace(str(ten_requests), qos_shares={"a": 1, "b": 1}, seed=3).requests
    again = from_trace(str(ten_requests), qos_shares={"a": 1, "b": 1}, seed=3).requests
    pd.testing.assert_frame_equal(first, again)
    assert set(first["qos_class"]) <= {"a", "b"}


# ------------------------------------------------------------------ malformed input

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
A1 = "2023-11-16 18:17:03.9799600,4808,10\n"
A2 = "2023-11-16 18:17:04.0319600,3180,8\n"
A3 = "2023-11-16 18:17:05.0000000,31,8\n"
BURST_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
CSV_HEADER = "arrival_s,num_prompt_tokens,num_output_tokens\n"


@pytest.mark.parametrize(
    ("name", "text", "line", "field", "words"),
    [
        ("missing_column.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03,5\n", 1, "GeneratedTokens", ["missing column", "TIMESTAMP"]),
        ("not_a_number.csv", AZURE_HEADER + A1 + "2023-11-16 18:17:04.0319600,abc,8\n" + A3, 3, "ContextTokens", ["not a number", "abc"]),
        ("negative_prompt.csv", AZURE_HEADER + A1 + A2 + "2023-11-16 18:17:05.0000000,-1,8\n", 4, "ContextTokens", [">= 0", "'-1'"]),
        ("negative_output.csv", AZURE_HEADER + A1 + A2 + "2023-11-16 18:17:05.0000000,31,-8\n", 4, "GeneratedTokens", [">= 0", "-8"]),
        ("fraction.csv", AZURE_HEADER + A1 + "2023-11-16 18:17:04.0319600,31.5,8\n", 3, "ContextTokens", ["whole number", "31.5"]),
        ("empty_value.csv", AZURE_HEADER + A1 + "2023-11-16 18:17:04.0319600,,8\n", 3, "ContextTokens", ["missing value"]),
        ("bad_time.csv", AZURE_HEADER + A1 + "yesterday,31,8\n" + A3, 3, "TIMESTAMP", ["cannot parse", "yesterday"]),
        ("short_time.csv", AZURE_HEADER + A1 + "12,31,8\n", 3, "TIMESTAMP", ["cannot parse", "'12'"]),
        ("backwards.csv", AZURE_HEADER + A1 + A3 + A2, 4, "TIMESTAMP", ["backwards", "18:17:04.0319600", "18:17:05.0000000", "line 3"]),
        ("earliest.csv", AZURE_HEADER + A1 + "bad,31,8\n" + "2023-11-16 18:17:04.0319600,zz,8\n", 3, "TIMESTAMP", ["bad"]),
        ("earliest2.csv", AZURE_HEADER + A1 + "2023-11-16 18:17:04.0319600,zz,8\n" + "bad,31,8\n", 3, "ContextTokens", ["zz"]),
        ("too_many_fields.csv", AZURE_HEADER + A1 + A2 + "2023-11-16 18:17:05.0000000,31,8,9\n", 4, None, ["malformed CSV row"]),
        ("burst_time.csv", BURST_HEADER + "5,ChatGPT,472,18,490,x\nsoon,ChatGPT,472,18,490,x\n", 3, "Timestamp", ["not a number", "soon"]),
        ("burst_prompt.csv", BURST_HEADER + "5,ChatGPT,472,18,490,x\n6,ChatGPT,-2,18,18,x\n", 3, "Request tokens", [">= 0", "'-2'"]),
        ("burst_negative.csv", BURST_HEADER + "5,ChatGPT,472,-3,490,x\n", 2, "Response tokens", [">= 0", "-3"]),
        ("csv_backwards.csv", CSV_HEADER + "1.0,5,5\n0.5,5,5\n", 3, "arrival_s", ["backwards", "'0.5'", "'1.0'", "line 2"]),
        ("csv_negative_time.csv", CSV_HEADER + "-1.0,5,5\n", 2, "arrival_s", [">= 0", "-1.0"]),
        ("bad.jsonl", '{"timestamp": 1, "input_length": 5, "output_length": 5}\n\n{"timestamp": 2, "input_length": 5,\n', 3, None, ["invalid JSON"]),
        ("list.jsonl", '{"timestamp": 1, "input_length": 5, "output_length": 5}\n[1, 2]\n', 2, None, ["not a JSON object"]),
        ("no_key.jsonl", '{"timestamp": 1, "input_length": 5}\n{"timestamp": 2, "input_length": 5}\n', 1, "output_length", ["missing key"]),
        ("one_key.jsonl", '{"timestamp": 1, "input_length": 5, "output_length": 5}\n{"timestamp": 2, "input_length": 5}\n', 2, "output_length", ["missing value"]),
        ("negative.jsonl", '{"timestamp": 1, "input_length": 5, "output_length": 5}\n{"timestamp": 2, "input_length": 5, "output_length": -1}\n', 2, "output_length", [">= 0"]),
        ("back.jsonl", '{"timestamp": 9, "input_length": 5, "output_length": 5}\n{"timestamp": 2, "input_length": 5, "output_length": 3}\n', 2, "timestamp", ["backwards", "= 2:", "after 9 on line 1"]),
        ("header_only.csv", AZURE_HEADER, 1, None, ["no data rows"]),
        ("empty.csv", "", 1, None, ["empty"]),
        ("empty.jsonl", "\n\n", 1, None, ["empty"]),
        ("unknown.csv", "when,in,out\n1,2,3\n", 1, None, ["cannot tell the trace format", "when,in,out"]),
    ],
)
def test_malformed_traces_raise_one_error_naming_file_line_field(tmp_path, name, text, line, field, words):
    path = write(tmp_path, name, text)
    with pytest.raises(InputError) as caught:
        from_trace(str(path))
    error, message = caught.value, str(caught.value)
    assert error.path == str(path) and error.line == line and f"{path}:{line}" in message, message
    if field is not None:
        assert error.field == field and repr(field) in message, message
    for word in words:
        assert word in message, message


def test_missing_file_and_bad_options_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        from_trace(str(tmp_path / "nope.csv"))
    path = write(tmp_path, "t.csv", CSV_HEADER + "0,1,1\n")
    with pytest.raises(InputError, match="format"):
        from_trace(str(path), format="parquet")
    with pytest.raises(InputError, match="max_requests"):
        from_trace(str(path), max_requests=0)
    with pytest.raises(InputError, match="target_qps"):
        from_trace(str(path), target_qps=-2)


# ------------------------------------------------------------------ the real Azure traces


def _first_rows(path: Path, count: int) -> list[tuple[float, int, int]]:
    """An independent parse with the csv module: (seconds after row 1, prompt, output)."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    start = datetime.strptime(rows[0]["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f")
    return [
        (
            (datetime.strptime(row["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f") - start).total_seconds(),
            int(row["ContextTokens"]),
            int(row["GeneratedTokens"]),
        )
        for row in rows[:count]
    ], len(rows)


@needs_traces
@pytest.mark.parametrize(("path", "num_rows"), [(AZURE_CODE, 8819), (AZURE_CONV, 19366)])
def test_real_azure_traces_load_completely(path, num_rows):
    workload = from_trace(str(path))
    df = workload.requests
    expected, num_data_rows = _first_rows(path, 50)
    assert len(df) == num_rows == num_data_rows and workload.num_filtered == {}
    assert df["arrival_s"].iloc[0] == 0.0 and (np.diff(df["arrival_s"]) >= 0).all()
    got = list(zip(df["arrival_s"][:50], df["num_prompt_tokens"][:50], df["num_output_tokens"][:50]))
    for (t, p, o), (t_ref, p_ref, o_ref) in zip(got, expected):
        assert (p, o) == (p_ref, o_ref) and t == pytest.approx(t_ref, abs=1e-6)


# ------------------------------------------------------------------ conf/workload


def _configs() -> list[Path]:
    return sorted(CONF.glob("*.yaml"))


def test_expected_configs_exist():
    names = {path.stem for path in _configs()}
    assert {"chat", "azure_conv_synthetic", "azure_code_synthetic", "azure_conv", "azure_code", "surge", "trace"} <= names


def composed(name: str, *overrides: str):
    """conf/workload/<name>.yaml as the run app composes it (seed and context from the top level)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        return compose(config_name="config", overrides=[f"workload={name}", *overrides]).workload


@pytest.mark.parametrize("path", _configs(), ids=lambda p: p.stem)
def test_every_config_composes(path, tmp_path):
    assert path.read_text().startswith("#"), "each config opens with a comment saying what it is"
    assert OmegaConf.to_container(OmegaConf.load(path))["seed"] == "${seed}", "the top-level seed feeds every workload"
    cfg = composed(path.stem)
    assert cfg._target_ in ("sim.workload.synthetic", "sim.workload.from_trace")
    if cfg._target_ == "sim.workload.from_trace":
        if OmegaConf.is_missing(cfg, "path"):
            cfg.path = str(write(tmp_path, "t.csv", CSV_HEADER + "0,1,1\n1,2,2\n"))
        elif not (PROJECT_ROOT / cfg.path).exists():
            pytest.skip(f"{cfg.path} not found")
        cfg.max_requests = 100
        workload = instantiate(cfg)
        assert 1 <= workload.num_requests <= 100
        return
    if "num_requests" in cfg and cfg.num_requests is not None:
        cfg.num_requests = min(cfg.num_requests, 5000)
    workload = instantiate(cfg)
    assert workload.num_requests > 0 and tuple(workload.requests.columns) == COLUMNS


def test_the_top_level_seed_feeds_the_workload():
    draws = {seed: instantiate(composed("chat", f"seed={seed}", "workload.num_requests=300")).requests
             for seed in (0, 1)}
    again = instantiate(composed("chat", "seed=1", "workload.num_requests=300")).requests
    pd.testing.assert_frame_equal(draws[1], again)
    for column in ("arrival_s", "num_prompt_tokens", "num_output_tokens", "qos_class"):
        assert not draws[0][column].equals(draws[1][column]), column


def test_synthetic_configs_fit_the_models_context():
    cfg = composed("chat", "workload.num_requests=5000")
    assert cfg.max_total_tokens == 8192  # cluster.max_model_len = Llama-3-8B's context
    df = instantiate(cfg).requests
    assert (df["num_prompt_tokens"] + df["num_output_tokens"] <= 8192).all()
    assert composed("chat", "model=llama3-70b", "cluster.max_model_len=4096").max_total_tokens == 4096


def test_surge_config_alternates_rates():
    workload = instantiate(composed("surge"))
    arrival = workload.requests["arrival_s"].to_numpy()
    counts = np.bincount((arrival // 900).astype(int), minlength=16)
    assert len(counts) == 16
    assert abs(counts[0::2].sum() - 8 * 900 * 2.0) < 3 * math.sqrt(8 * 900 * 2.0)
    assert abs(counts[1::2].sum() - 8 * 900 * 5.0) < 3 * math.sqrt(8 * 900 * 5.0)


@needs_traces
@pytest.mark.parametrize(("config", "trace"), [("azure_conv_synthetic", AZURE_CONV), ("azure_code_synthetic", AZURE_CODE)])
def test_synthetic_azure_configs_hold_the_fitted_parameters(config, trace):
    pytest.importorskip("scipy")
    from experiments.fit_lengths import fit_column

    cfg = OmegaConf.load(CONF / f"{config}.yaml")
    df = from_trace(str(trace)).requests
    for key, column in (("prompt_tokens", "num_prompt_tokens"), ("output_tokens", "num_output_tokens")):
        fit = fit_column(df[column].to_numpy())
        assert cfg[key].median == round(fit["mle"]["median"])
        assert cfg[key].sigma == pytest.approx(fit["mle"]["sigma"], abs=5e-4)
        assert cfg[key].max == fit["trace"]["max"]
    assert cfg.arrival.rate_qps == pytest.approx((len(df) - 1) / df["arrival_s"].iloc[-1], abs=5e-3)


def test_fit_recovers_known_lognormal_parameters():
    pytest.importorskip("scipy")
    from experiments.fit_lengths import discrete_cdf, fit_column, ks_distance

    values = np.random.default_rng(1).lognormal(math.log(300), 0.7, 20_000).round().clip(1, 5000)
    fit = fit_column(values)
    assert fit["mle"]["median"] == pytest.approx(300, rel=0.02)
    assert fit["mle"]["sigma"] == pytest.approx(0.7, rel=0.02)
    assert fit["mle"]["ks"] < 1.36 / math.sqrt(20_000) * 1.5  # near the 5% critical value of KS
    # ks_distance: data {1, 2} against a point mass at 2 differs by 1/2 at k = 1
    assert ks_distance(np.array([1, 2]), np.array([0.0, 0.0, 1.0])) == 0.5
    assert discrete_cdf(300, 0.7, 5000)[-1] == 1.0


# ---------------------------------------------------------------- trace lengths on synthetic arrivals


def test_trace_workload_keeps_the_requests_and_scales_the_arrivals(tmp_path):
    trace = tmp_path / "t.csv"
    rng = np.random.default_rng(1)
    pd.DataFrame({"arrival_s": np.arange(50.0), "num_prompt_tokens": rng.integers(1, 4000, 50),
                  "num_output_tokens": rng.integers(1, 500, 50)}).to_csv(trace, index=False)
    kw = dict(path=str(trace), num_requests=500, qos_shares={"a": 1, "b": 1}, seed=3)
    slow = trace_workload(arrival={"kind": "poisson", "rate_qps": 1.0}, **kw).requests
    fast = trace_workload(arrival={"kind": "poisson", "rate_qps": 4.0}, **kw).requests
    for col in ("num_prompt_tokens", "num_output_tokens", "qos_class"):
        assert slow[col].tolist() == fast[col].tolist()
    np.testing.assert_allclose(slow["arrival_s"] / 4.0, fast["arrival_s"])
    assert set(slow["qos_class"]) == {"a", "b"}
    pairs = set(zip(pd.read_csv(trace)["num_prompt_tokens"], pd.read_csv(trace)["num_output_tokens"]))
    assert set(zip(slow["num_prompt_tokens"], slow["num_output_tokens"])) <= pairs  # drawn jointly
    other = trace_workload(arrival={"kind": "poisson", "rate_qps": 1.0}, **{**kw, "seed": 4}).requests
    assert other["num_prompt_tokens"].tolist() != slow["num_prompt_tokens"].tolist()


def test_a_missing_trace_says_how_to_get_it(tmp_path):
    with pytest.raises(InputError, match="AzurePublicDataset"):
        trace_workload(path=str(tmp_path / "nope.csv"), arrival={"kind": "poisson", "rate_qps": 1.0}, num_requests=5)
    with pytest.raises(InputError, match="exactly one of num_requests and duration_s"):
        trace_workload(path=str(tmp_path / "nope.csv"), arrival={"kind": "poisson", "rate_qps": 1.0})


def test_sharegpt_lengths_on_another_traces_arrivals_with_a_context_cap_and_model_shares(tmp_path):
    """ShareGPT length statistics have no clock: their pairs go on the arrival times of another
    trace; pairs longer than the context are left out of the pool and counted; models are drawn
    by share."""
    lengths = write(tmp_path, "sharegpt.csv", "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                    "10,20,30,0.5\n4000,200,4200,20\n30,40,70,0.75\n")
    clock = write(tmp_path, "clock.csv", CSV_HEADER + "0.0,5,5\n0.5,5,5\n0.75,5,5\n2.0,5,5\n")
    assert from_trace(str(lengths)).requests["arrival_s"].tolist() == [0.0, 0.0, 0.0]
    wl = trace_workload(path=str(lengths), arrival={"kind": "trace", "path": str(clock)}, num_requests=3,
                        max_total_tokens=4096, model_shares={"a": 0.5, "b": 0.5}, seed=1)
    req = wl.requests
    assert req["arrival_s"].tolist() == [0.0, 0.5, 0.75]
    assert set(zip(req["num_prompt_tokens"], req["num_output_tokens"])) <= {(10, 20), (30, 40)}
    assert wl.num_filtered["over_max_total_tokens"] == 1
    assert set(req["model"]) <= {"a", "b"}
    with pytest.raises(InputError, match="only 4 arrivals"):
        trace_workload(path=str(lengths), arrival={"kind": "trace", "path": str(clock)}, num_requests=5)
    with pytest.raises(InputError, match="fits 5 tokens"):
        trace_workload(path=str(lengths), arrival={"kind": "poisson", "rate_qps": 1.0}, num_requests=2,
                       max_total_tokens=5)
    with pytest.raises(InputError, match="unknown key"):
        trace_workload(path=str(lengths), arrival={"kind": "trace", "path": str(clock), "rate": 2}, num_requests=2)
