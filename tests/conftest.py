"""Shared test configuration: the ``slow`` marker, applied in one place.

``pytest`` (``make test``, CI) runs every test. ``pytest -m "not slow"`` is the fast inner loop:
it leaves out the tests listed in :data:`SLOW` and any test marked ``@pytest.mark.slow`` in its
own file.

An entry names a test function (``path::name``, all its parameter sets) or one parameter set
(``path::name[id]``). The number beside it is the CPU seconds it took — the test process's and
the child processes' it waits for (torchrun, the CLI), which a loaded machine does not inflate
as it does wall time — measured over the whole suite on the 2-core machine; about 3 CPU seconds
is 2 s of wall time alone. ``tests/test_conftest.py`` fails when an entry names a test that no
longer exists, so a rename cannot silently put a slow test back into the fast loop.
"""

from __future__ import annotations

import os

import pytest

#: Tests that take more than about 2 s alone on 2 cores, with the CPU seconds measured.
SLOW: dict[str, float] = {
    # long training runs and real data
    "tests/diagnosis/test_monitor.py::test_mini_batch_sgd_keeps_full_batch_sharpness_below_the_"
    "limit_the_more_the_smaller_the_batch": 68.7,
    "tests/examples/test_quickstart.py::test_quickstart_runs_and_reports_direction_and_shape": 22.9,
    "tests/optim/test_methods.py::test_diagonal_estimators_are_unbiased": 18.6,
    "tests/optim/test_methods.py::test_adahessian_and_sophia_train_the_digits_mlp": 14.5,
    "tests/diagnosis/test_monitor.py::"
    "test_adam_preconditioned_sharpness_settles_near_38_over_lr": 10.1,
    "tests/diagnosis/test_monitor.py::"
    "test_full_batch_gd_reaches_and_holds_the_edge_of_stability": 7.5,
    "tests/diagnosis/test_precision.py::test_a_monitor_in_a_training_loop_under_autocast": 4.0,
    "tests/diagnosis/test_review_classify.py::"
    "test_a_warm_up_into_a_blow_up_is_not_called_the_edge_and_a_held_rate_is": 9.0,
    "tests/spectrum/test_eigen.py::test_a_restart_for_one_end_keeps_the_far_ends_outliers": 6.0,
    "tests/diagnosis/test_diagnosis.py::"
    "test_a_network_whose_relus_all_died_is_not_called_converged": 3.7,
    # the verdicts' seven training runs, in a module fixture that the first test pays for (the
    # module's other tests are marked slow in the file: they would pay for it instead)
    "tests/diagnosis/test_verdicts.py::test_the_subset_covers_every_kind_of_outcome": 9.5,
    # two processes whose loops run at different speeds, under the default cadence
    "tests/distributed/test_distributed.py::"
    "test_the_default_cadence_probes_at_the_same_steps_on_every_rank": 9.3,
    # dense references of the larger models
    "tests/derivatives/test_curvature.py::"
    "test_empirical_fisher_is_mean_of_per_sample_gradient_outer_products": 15.9,
    "tests/derivatives/test_curvature.py::test_hessian_matches_jacfwd_grad[transformer]": 13.9,
    "tests/derivatives/test_curvature.py::test_ggn_matches_jacobian_reference[transformer]": 11.8,
    "tests/derivatives/test_curvature.py::"
    "test_uneven_batches_and_loader_give_the_full_batch_operator[empirical_fisher]": 3.7,
    "tests/derivatives/test_trust.py::test_a_shuffled_loader_equals_the_list_of_its_batches": 13.7,
    "tests/spectrum/test_precision.py::test_density[layernorm-fp16]": 5.5,
    # other processes: torchrun, the command line, Hugging Face models, a browser
    "tests/distributed/test_distributed.py::test_probe_under_torchrun_matches_one_process": 14.5,
    "tests/distributed/test_distributed.py::test_two_ranks_equal_one_process_on_the_full_data": 6.6,
    "tests/distributed/test_fsdp.py::"
    "test_fsdp2_finite_difference_products_equal_the_exact_single_process_product": 7.5,
    "tests/distributed/test_fsdp.py::"
    "test_fsdp2_diagnose_by_finite_differences_equals_the_exact_single_process_diagnosis": 9.8,
    "tests/distributed/test_distributed.py::"
    "test_a_failed_rank_ends_the_others_with_a_clear_error": 3.5,
    "tests/distributed/test_distributed.py::"
    "test_ranks_that_build_different_operators_get_the_same_clear_error": 3.2,
    "tests/distributed/test_distributed.py::"
    "test_data_refused_on_one_rank_stops_every_rank_at_once": 3.2,
    "tests/distributed/test_distributed.py::"
    "test_one_ranks_bad_data_or_loss_gives_every_rank_the_same_verdict": 3.5,
    "tests/distributed/test_distributed.py::"
    "test_a_nan_loss_on_one_rank_calls_a_probe_on_every_rank": 4.5,
    "tests/derivatives/test_review_modules.py::"
    "test_the_empirical_fisher_check_reads_rounding_against_the_terms_not_their_mean": 3.8,
    "tests/distributed/test_distributed.py::"
    "test_a_mean_refused_on_one_ranks_data_stops_every_rank_at_once": 6.5,
    "tests/distributed/test_distributed.py::"
    "test_a_gauss_newton_of_0_is_refused_only_when_no_ranks_loss_curves": 4.0,
    "tests/distributed/test_rank_checks.py::"
    "test_ranks_refuse_different_values_losses_and_a_log_rank_0_cannot_open": 3.5,
    "tests/distributed/test_chance_ranks.py::"
    "test_two_ranks_chance_equals_one_process_on_the_full_data": 3.5,
    "tests/distributed/test_same_call.py::"
    "test_a_call_that_differs_between_ranks_is_refused_on_every_rank": 9.0,
    "tests/diagnosis/test_review_forecast.py::"
    "test_every_rank_forecasts_at_the_same_step_when_their_losses_differ": 4.7,
    "tests/integrations/test_huggingface_probe.py::"
    "test_probe_on_gpt2_with_its_own_loss_and_a_report": 25.6,
    "tests/integrations/test_huggingface_probe.py::"
    "test_probe_judges_adamw_by_a_trainer_checkpoint": 13.7,
    "tests/integrations/test_integrations.py::test_transformers_trainer_callback": 3.5,
    "tests/cli/test_cli.py::test_lab_writes_results_plots_and_report": 9.0,
    "tests/cli/test_cli.py::test_report_renders_a_monitor_log": 8.8,
    "tests/cli/test_cli.py::test_probe_on_a_built_in_problem": 3.4,
    "tests/cli/test_cli.py::"
    "test_probe_slices_of_a_list_of_two_batches_against_dense_references": 3.1,
    "tests/cli/test_probe_optimizer_state.py::test_adam_is_judged_by_its_saved_state": 6.4,
    "tests/cli/test_probe_optimizer_state.py::test_lr_replaces_the_saved_learning_rate": 4.7,
    # Chromium's own time is not counted above: 4.4 and 1.6 s of wall time on the shared machine
    "tests/cli/test_cli.py::test_report_in_a_real_browser": 1.9,
    "tests/report/test_html.py::test_no_injected_script_runs_in_a_real_browser": 1.1,
    # two gloo processes: sharded vectors (measured alone: 10 s of wall time)
    "tests/distributed/test_sharded.py::test_sharded_vectors_of_an_fsdp2_model": 26.0,
    # float32 transformers' finite differences against their exact products
    "tests/derivatives/test_fd_transformers.py::"
    "test_gpt2_top_direction_is_accurate_in_float32": 3.9,
    "tests/derivatives/test_fd_transformers.py::"
    "test_float32_rounding_that_no_step_fixes_is_reported": 8.7,
    "tests/derivatives/test_fd_transformers.py::"
    "test_float32_differences_under_adam_are_never_confidently_wrong": 9.4,
    # two gloo processes: the diagnosis and the Monitor on sharded vectors (wall time)
    "tests/distributed/test_sharded_diagnosis.py::"
    "test_a_sharded_diagnosis_equals_the_exact_one_without_gathering_the_model": 21.3,
    "tests/distributed/test_sharded_diagnosis.py::"
    "test_a_sharded_monitor_says_what_a_whole_vector_one_says_without_gathering": 9.8,
    "tests/derivatives/test_finite_difference.py::"
    "test_a_warm_start_along_a_far_from_quadratic_direction_is_accurate": 3.5,
    # four and two gloo processes (measured alone: 28 and 17 s of wall time)
    "tests/distributed/test_meshes.py::"
    "test_hsdp_products_equal_the_exact_single_process_ones": 22.0,
    "tests/distributed/test_meshes.py::"
    "test_tensor_parallel_products_are_not_summed_over_the_ranks": 11.6,
    # one gloo process, shared by three tests (its time counted on the first; the others are
    # listed because alone they would start it): FSDP2 under four mixed-precision policies,
    # measured after an evaluation forward, and mid-accumulation
    "tests/distributed/test_fsdp.py::"
    "test_a_mixed_precision_policy_narrower_than_the_parameters_is_refused_with_the_fix": 4.5,
    "tests/distributed/test_fsdp.py::"
    "test_a_model_measured_after_an_evaluation_forward_is_resharded_first": 1.0,
    "tests/distributed/test_fsdp.py::"
    "test_a_gradient_accumulation_in_progress_is_refused_before_any_pass": 0.1,
    # four gloo processes: HSDP's sharded vectors (wall time: 26-37 s as the load varied)
    "tests/distributed/test_hsdp_sharded.py::test_sharded_vectors_of_an_hsdp_model": 30.0,
    # two gloo processes, each building DeepSpeed ZeRO engines (wall time, load 2.5)
    "tests/distributed/test_deepspeed.py::"
    "test_zero3_products_equal_the_exact_single_process_product": 20.4,
    "tests/distributed/test_deepspeed.py::"
    "test_what_zero3_products_do_not_support_is_refused_with_the_fix": 13.3,
    "tests/distributed/test_deepspeed.py::"
    "test_an_engine_that_leaves_the_accumulation_to_the_user_counts_only_its_micro_batches": 8.9,
    # (CPU seconds, load 3.7: three engines trained, two diagnosed, a Monitor's probe)
    "tests/distributed/test_deepspeed.py::"
    "test_the_engines_optimizer_gives_the_stability_limit_of_a_twin_trained_in_one_process": 21.3,
}


def slow_key(nodeid: str) -> str:
    """The :data:`SLOW` key of a collected test: its node id without the parameters."""
    return nodeid.split("[", 1)[0]


def is_listed(nodeid: str) -> bool:
    """Whether :data:`SLOW` lists this test, by its function or by its parameter set."""
    return nodeid in SLOW or slow_key(nodeid) in SLOW


#: The node ids collected in this session, before ``-m``/``-k`` deselect any.
COLLECTED = pytest.StashKey[frozenset[str]]()


@pytest.hookimpl(tryfirst=True)  # before the deselection by -m "not slow"
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[COLLECTED] = frozenset(item.nodeid for item in items)
    for item in items:
        if is_listed(item.nodeid):
            item.add_marker(pytest.mark.slow)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker gets its share of the cores, not all of them.

    torch sizes its intra-op thread pool to the whole machine in every process, and kernels
    as small as BatchNorm, softmax, cross-entropy, tanh and a 1x1 Conv1d on these tests' tiny
    tensors each open an OpenMP parallel region whose threads spin-wait at its barrier. With
    every worker spinning a full pool the regions stall: ``-n 2 -m "not slow" tests/derivatives
    tests/diagnosis`` on the 2-core machine took 224-255 s with two threads a worker and
    20-49 s with one (the tests' CPU seconds 184-193 against 15-17), single tests 25-80x their
    time alone (0.11 s -> 7-9 s); under ``-n 16`` on a 16-core machine four such tests failed
    ``--timeout 120`` and passed alone. Without xdist nothing changes."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models, restored after it: their threads only add
    synchronisation (tenfold on a busy 2-core machine). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
