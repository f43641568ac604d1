"""taro_trace with n > 1 (issue 15, D12): one a_t list per choice, never the samples interleaved.

Recorder level here (no vLLM engine); the V2 model state in test_v2_runner.py, the V1 runner end to end through
``taro_llm`` in test_serving_llm.py (``test_trace_with_n_gives_one_list_per_choice``).
"""

import torch

from taro_vllm.serving.alphas import AlphaRecorder, choice_indices


def test_choice_indices_come_from_vllms_child_request_ids():
    assert choice_indices(["1_0-abcd1234", "0_0-abcd1234"]) == [1, 0]
    assert choice_indices(["10_cmpl-x-0-ab12cd34", "2_cmpl-x-0-ab12cd34"]) == [10, 2]
    # Not the children of one parent (two prompts, or ids vLLM did not make): numbered in recorded order.
    assert choice_indices(["0_a-1", "0_b-2"]) == [0, 1]
    assert choice_indices(["cmpl-1-0-aa", "cmpl-1-1-bb"]) == [0, 1]
    assert choice_indices([None]) == [0]


def test_one_request_keeps_the_flat_alphas_shape():
    rec = AlphaRecorder()
    for a in (0.25, 0.5):
        rec.record(torch.tensor([a, 0.9]), [("t", "5_user-id-ab12cd34"), None])  # a "_" id alone: still one list
    assert rec.pop_trace("t") == {"alphas": [0.25, 0.5]}
    rec.record(torch.tensor([0.375]), ["legacy"])  # a bare trace id (request unknown)
    assert rec.pop("legacy") == [0.375]
    assert rec.pop("legacy") is None and rec.pop_trace("t") is None  # returned once


def test_samples_of_one_request_get_one_list_each_in_choice_order():
    rec = AlphaRecorder(max_tokens=3)
    parent = "0-abcd1234"
    # Rows in another order than the choices, a sample that finishes early, an untraced row in between.
    rec.record(torch.tensor([0.125, 0.75, 0.25]), [("t", f"1_{parent}"), None, ("t", f"0_{parent}")])
    rec.record(torch.tensor([0.375, 0.5]), [("t", f"0_{parent}"), ("t", f"1_{parent}")])
    rec.record(torch.tensor([0.625]), [("t", f"0_{parent}")])
    rec.record(torch.tensor([0.875]), [("t", f"0_{parent}")])  # over max_tokens: dropped
    assert rec.pop_trace("t") == {"choices": [{"index": 0, "alphas": [0.25, 0.375, 0.625]},
                                              {"index": 1, "alphas": [0.125, 0.5]}]}
    rec.record(torch.tensor([0.125, 0.25]), [("u", f"0_{parent}"), ("u", f"1_{parent}")])
    assert rec.pop("u") == [[0.125], [0.25]]


def test_recording_outside_inference_mode_after_an_engine_step_inside_it():
    """An engine records under torch.inference_mode; a later caller (another engine, a test) may not be in it."""
    import torch

    from taro_vllm.serving.alphas import AlphaRecorder

    rec = AlphaRecorder()
    with torch.inference_mode():
        rec.record(torch.tensor([0.2, 0.4]), None)
    rec.record(torch.tensor([0.6]), None)
    stats = rec.stats()
    assert stats["count"] == 3 and abs(stats["sum"] - 1.2) < 1e-6
