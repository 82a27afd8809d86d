"""The profile analysis behind docs/performance.md's "where the time goes" numbers (benchmarks/peers/bench_peers.py):
busy and idle time over all CUDA streams, copies hidden under compute, and the GPU's idle gaps by cause."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))

from bench_peers import timeline_from_events  # noqa: E402


def _kernel(ts, dur, corr, stream=7, cat="kernel", name="k"):
    return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "tid": stream, "name": name,
            "args": {"correlation": corr, "External id": corr}}


def test_busy_hidden_and_idle_time_over_all_streams():
    events = [
        _kernel(0, 1000, 1), _kernel(1500, 500, 2),                      # compute: 0-1 ms, 1.5-2 ms
        _kernel(800, 400, 3, stream=13, cat="gpu_memcpy"),               # a copy: 0.2 ms under compute, 0.2 ms not
        _kernel(2100, 2000, 4),                                          # after a 0.1 ms gap
    ]
    t = timeline_from_events(events)
    assert t["first_to_last_ms"] == 4.1
    assert t["compute_busy_ms"] == 3.5 and t["copy_busy_ms"] == 0.4
    assert t["gpu_busy_ms"] == 3.7 and t["copy_hidden_ms"] == 0.2
    assert t["idle_ms"] == 0.4  # 1.2-1.5 ms and 2.0-2.1 ms
    assert t["per_stream_ms"] == {"13": 0.4, "7": 3.5}


def test_gaps_are_attributed_to_the_host_op_that_ended_them():
    events = [
        _kernel(0, 100, 1), _kernel(160, 100, 2), _kernel(2400, 50, 3, name="adam"),
        *({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 5, "args": {"correlation": c}}
          for ts, c in ((120, 2), (2000, 3))),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 110, "dur": 30, "args": {"External id": 2}},
        {"ph": "X", "cat": "cpu_op", "name": "Optimizer.step", "ts": 1900, "dur": 400, "args": {"External id": 3}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::_foreach_sqrt", "ts": 1990, "dur": 20, "args": {"External id": 3}},
    ]
    g = timeline_from_events(events)["gaps"]
    assert g["by_size"]["20-100us"] == {"count": 1, "ms": 0.1}  # 60 us, rounded
    assert g["by_size"][">1ms"] == {"count": 1, "ms": 2.1}  # 2,140 us
    # the second kernel was launched (t=120) after the GPU went idle (t=100): the host was late; so was the third
    assert g["host_late_ms"] == 2.2
    assert [(x["op"], x["count"]) for x in g["before_op"]] == [("aten::_foreach_sqrt", 1), ("aten::mm", 1)]
    # the largest gaps first, each placed in the step and named by the kernels around it and the launching op
    assert [(x["ms"], x["at_ms"], x["next_op"]) for x in g["largest"]] == [(2.14, 0.3, "aten::_foreach_sqrt"),
                                                                            (0.06, 0.1, "aten::mm")]
    assert g["largest"][0]["next"] == "adam"


def test_no_device_events_give_an_empty_timeline():
    assert timeline_from_events([{"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 5}]) == {}
