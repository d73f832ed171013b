"""The progress line's throughput keeps three significant digits at every scale."""

import io

import pytest

from hpcps.metrics.progress_line import ProgressLine, three_digits


@pytest.mark.parametrize("value,text", [(0, "0"), (0.5, "0.500"), (9.996, "10.0"), (162, "162"),
                                        (999.4, "999"), (999.6, "1.00k"), (1620, "1.62k"),
                                        (16234, "16.2k"), (162345, "162k"), (999600, "1.00M"),
                                        (1.62e6, "1.62M"), (2.5e10, "25.0G")])
def test_three_digits(value, text):
    assert three_digits(value) == text


def test_a_slow_model_prints_its_tokens_per_second():
    out = io.StringIO()
    line = ProgressLine(max_steps=10, log_every=1, quiet=False, stream=out)
    line.step({"step": 1, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 162.0, "step_s": 2.0})
    assert " | 162 tok/s | " in out.getvalue()
    assert "0.2k" not in out.getvalue()     # the one-decimal "k" format this replaced
