"""lm-eval runs for real, offline, on tiny MoE models: our model type, routings, adapters, tasks and CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

lm_eval = pytest.importorskip("lm_eval")  # the optional extra "eval"

from hf_moe_routing import TopKConfig, TopPConfig, patch_model, save_routing_adapter  # noqa: E402
from hf_moe_routing.cli.main import main  # noqa: E402
from hf_moe_routing.data import data_dir, train_tokenizer  # noqa: E402
from hf_moe_routing.integrations.lm_eval import TASKS_DIR, task_manager  # noqa: E402
from hf_moe_routing.integrations.lm_eval.model import routing_config_from_args  # noqa: E402
from hf_moe_routing.integrations.lm_eval.task_data import blimp_dataset, split_articles  # noqa: E402
from hf_moe_routing.testing import GENERIC_FAMILIES, REQUIRED_FAMILIES, tiny_model  # noqa: E402

BLIMP = "blimp_local_adjunct_island"
WIKI = "wikitext2_local"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~10x faster on one thread than on two when the CPU cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    try:
        return data_dir()
    except FileNotFoundError as error:
        pytest.skip(f"shared data folder missing: {error}")


def _save_tiny(path, family, data):
    """A tiny random MoE of ``family`` with a word-level tokenizer trained on the evaluated text."""
    texts = []
    for name in ("adjunct_island", "wh_island"):
        for line in (data / "blimp" / f"{name}.jsonl").read_text().splitlines():
            pair = json.loads(line)
            texts += [pair["sentence_good"], pair["sentence_bad"]]
    texts += (data / "wikitext-2" / "test.txt").read_text().splitlines()[:300]
    tokenizer = train_tokenizer(texts, vocab_size=1024, kind="word", min_frequency=1)
    tiny_model(family, vocab_size=1024).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, data):
    return _save_tiny(tmp_path_factory.mktemp("mixtral"), "mixtral", data)


@pytest.fixture(scope="module")
def tasks(data):
    # only our tasks: indexing lm-eval's ~10k built-in task files takes ~20 s on 2 CPU cores
    return task_manager(data_dir=data, include_defaults=False)


def _evaluate(model_dir, tasks, model_args="", task_names=(BLIMP, WIKI), limit=3):
    args = f"pretrained={model_dir},dtype=float32" + (f",{model_args}" if model_args else "")
    return lm_eval.simple_evaluate(
        model="hf-moe-routing",
        model_args=args,
        tasks=list(task_names),
        device="cpu",
        limit=limit,
        task_manager=tasks,
        bootstrap_iters=0,
        log_samples=True,
    )


def _sentence_logprob(model, tokenizer, text):
    """log p(text | BOS), as lm-eval scores a BLiMP sentence after an empty context."""
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)
    return logp[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()


def _check_blimp_against_model(results, model_dir, config):
    """lm-eval's log-likelihoods are those of the model under ``config``, and acc = mean[lp(good) > lp(bad)]."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    unpatched = []
    if config is not None:  # log p(good) without the routing, to check that lm-eval used it
        unpatched = [
            _sentence_logprob(model, tokenizer, s["doc"]["sentence_good"]) for s in results["samples"][BLIMP]
        ]
        patch_model(model, config)
    wins, changes = [], []
    for i, sample in enumerate(results["samples"][BLIMP]):
        good, bad = (resp[0][0] for resp in sample["resps"])
        assert good == pytest.approx(
            _sentence_logprob(model, tokenizer, sample["doc"]["sentence_good"]), abs=1e-4
        )
        assert bad == pytest.approx(
            _sentence_logprob(model, tokenizer, sample["doc"]["sentence_bad"]), abs=1e-4
        )
        if unpatched:
            changes.append(abs(good - unpatched[i]))
        wins.append(good > bad)
    assert not unpatched or max(changes) > 1e-3  # the routing really changed what lm-eval measured
    assert results["results"][BLIMP]["acc,none"] == pytest.approx(sum(wins) / len(wins))


def test_import_registers_the_model_type_without_importing_lm_eval_models():
    code = (
        "import sys, hf_moe_routing\n"
        "from lm_eval.api.registry import get_model, model_registry\n"
        "assert 'hf-moe-routing' in model_registry\n"
        "assert 'lm_eval.models.huggingface' not in sys.modules\n"
        "assert 'hf_moe_routing.integrations.lm_eval.model' not in sys.modules\n"
        "assert get_model('hf-moe-routing').__name__ == 'HFMoERoutingLM'\n"
        "assert get_model('hf').__name__ == 'HFLM'\n"  # lm-eval's own models still resolve
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("model_args", "config"),
    [
        ("routing=topk,routing_top_k=1", TopKConfig(top_k=1)),
        ("routing=top_p,routing_p=0.5", TopPConfig(p=0.5)),
        ("", None),
    ],
    ids=["topk1", "top_p", "model"],
)
def test_simple_evaluate_reports_lm_eval_metrics_and_routing_stats(mixtral_dir, tasks, model_args, config):
    results = _evaluate(mixtral_dir, tasks, model_args, limit=3)
    _check_blimp_against_model(results, mixtral_dir, config)
    wiki = results["results"][WIKI]
    assert 1 < wiki["word_perplexity,none"] < math.inf and 1 < wiki["byte_perplexity,none"] < math.inf
    assert wiki["bits_per_byte,none"] == pytest.approx(math.log2(wiki["byte_perplexity,none"]))

    stats = results["config"]["routing_stats"]
    assert stats["routing_config"] == (config.to_dict() if config else None)
    assert stats["top_k"] == 2 and stats["num_experts"] == 8 and stats["num_tokens"] > 0
    assert list(stats["activated_per_layer"]) == ["0", "1"]
    flops, flops_topk = stats["flops_per_token"]["total"], stats["flops_per_token_topk"]["total"]
    if config is None:  # the model's own top-2
        assert stats["mean_activated"] == pytest.approx(2.0)
        assert flops == pytest.approx(flops_topk) and stats["flops_reduction"] == pytest.approx(0.0)
    elif isinstance(config, TopKConfig):
        assert stats["mean_activated"] == pytest.approx(1.0)
        assert 0 < stats["flops_reduction"] < 1 and flops < flops_topk
    else:  # top-p: a variable number of experts per token, between 1 and top-k
        assert 1.0 < stats["mean_activated"] < 2.0
        assert all(1.0 <= v <= 2.0 for v in stats["activated_per_layer"].values())
        assert flops < flops_topk
    assert stats["avg_max_vio"] >= 0 and stats["sup_max_vio"] >= stats["avg_max_vio"]
    json.dumps(results["config"]["routing_stats"])  # JSON-ready, as lm-eval writes it


def test_adapter_model_arg_loads_a_saved_routing_adapter(mixtral_dir, tasks, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    patch_model(model, TopPConfig(p=0.5))
    adapter = save_routing_adapter(model, tmp_path / "adapter", model_card=False)
    results = _evaluate(mixtral_dir, tasks, f"adapter={adapter}", task_names=[BLIMP], limit=3)
    stats = results["config"]["routing_stats"]
    assert stats["adapter"] == str(adapter)
    assert stats["routing_config"] == TopPConfig(p=0.5).to_dict()
    _check_blimp_against_model(results, mixtral_dir, TopPConfig(p=0.5))


def test_bad_model_args_fail_before_loading_with_clear_messages(tasks, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown routing method 'nonsense'\. Known: .*topk"):
        _evaluate(tmp_path / "not-loaded", tasks, "routing=nonsense")
    with pytest.raises(ValueError, match="without a method: add routing=NAME"):
        _evaluate(tmp_path / "not-loaded", tasks, "routing_top_k=1")
    with pytest.raises(ValueError, match="either routing=.* or adapter="):
        _evaluate(tmp_path / "not-loaded", tasks, "routing=topk,adapter=somewhere")
    with pytest.raises(ValueError, match=r"Unknown TopKConfig settings \['k'\]"):
        _evaluate(tmp_path / "not-loaded", tasks, "routing=topk,routing_k=1")


def test_routing_settings_from_json_string_file_or_dict(tmp_path):
    assert routing_config_from_args("topk", '{"top_k": 1}') == TopKConfig(top_k=1)
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(TopPConfig(p=0.7).to_dict()))
    assert routing_config_from_args(None, str(path)) == TopPConfig(p=0.7)
    assert routing_config_from_args("top_p", {"p": 0.3}, {"p": 0.6}) == TopPConfig(p=0.6)  # settings win
    assert routing_config_from_args() is None
    with pytest.raises(ValueError, match="contradicts"):
        routing_config_from_args("topk", str(path))
    with pytest.raises(ValueError, match="neither a JSON object"):
        routing_config_from_args("topk", "missing.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        routing_config_from_args("topk", "{top_k: 1}")


def test_packaged_tasks_cover_every_blimp_paradigm_and_wikitext(tasks, data):
    paradigms = sorted(p.stem for p in (data / "blimp").glob("*.jsonl"))
    assert len(paradigms) == 67
    assert "blimp_local" in tasks.all_groups
    assert sorted(t for t in tasks.all_subtasks if t.startswith("blimp_local_")) == [
        f"blimp_local_{p}" for p in paradigms
    ]
    assert WIKI in tasks.all_subtasks
    group = (TASKS_DIR / "blimp_local" / "_blimp_local.yaml").read_text()
    assert all(f"- blimp_local_{p}\n" in group for p in paradigms)


def test_task_data_is_read_from_the_configured_folder(tmp_path, monkeypatch):
    (tmp_path / "blimp").mkdir()
    pair = {"sentence_good": "Cats sleep.", "sentence_bad": "Cats sleeps.", "UID": "mini"}
    (tmp_path / "blimp" / "mini.jsonl").write_text(json.dumps(pair) + "\n")
    assert blimp_dataset("mini", data_dir=tmp_path)["test"][0]["sentence_bad"] == "Cats sleeps."
    monkeypatch.setenv("HF_MOE_ROUTING_DATA", str(tmp_path))
    assert blimp_dataset("mini")["test"].num_rows == 1
    with pytest.raises(FileNotFoundError, match="--metadata data_dir=DIR"):
        blimp_dataset("adjunct_island", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="HF_MOE_ROUTING_DATA"):
        blimp_dataset("mini", data_dir=tmp_path / "nowhere")


def test_split_articles_starts_a_document_at_each_top_level_heading():
    lines = [" \n", " = A = \n", " \n", " a text \n", " = = Section = = \n", " more \n", " = B = \n", " b \n"]
    assert split_articles(lines) == ["= A = \n \n a text \n = = Section = = \n more", "= B = \n b"]


@pytest.fixture
def cli_tasks_only_ours(monkeypatch):
    """The CLI as is, except that lm-eval does not index its ~10k built-in task files (slow on 2 cores)."""
    import lm_eval.tasks

    class OursOnly(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OursOnly)
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap stderr without a process pool


def test_cli_passes_lm_eval_options_through_and_prints_routing_stats(
    tmp_path_factory, data, cli_tasks_only_ours, capsys
):
    model_dir = _save_tiny(tmp_path_factory.mktemp("qwen2_moe"), "qwen2_moe", data)
    out = tmp_path_factory.mktemp("results")
    argv = ["lm-eval", "--model_args", f"pretrained={model_dir},routing=top_p,routing_p=0.5,dtype=float32"]
    argv += ["--tasks", f"{BLIMP},blimp_local_wh_island", WIKI, "--limit", "1", "--device", "cpu"]
    argv += ["--output_path", str(out), "--log_samples", "--data_dir", str(data)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "|blimp_local_wh_island" in printed and "word_perplexity" in printed  # lm-eval's own tables
    assert (
        "routing statistics" in printed and "top_p(p=0.5)" in printed and "mean activated experts" in printed
    )

    (results_file,) = out.rglob("results_*.json")
    saved = json.loads(results_file.read_text())
    assert saved["config"]["model"] == "hf-moe-routing"  # the default --model
    stats = saved["config"]["routing_stats"]
    assert stats["routing_config"] == TopPConfig(p=0.5).to_dict() and 1.0 <= stats["mean_activated"] < 2.0
    assert len(list(out.rglob("samples_*.jsonl"))) == 3  # --log_samples went through


def test_cli_help_and_user_errors(cli_tasks_only_ours, capsys, tmp_path):
    assert main(["lm-eval", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "routing=NAME" in printed and "--data_dir" in printed  # ours
    assert (
        "--model_args" in printed and "--include_path" in printed and "--log_samples" in printed
    )  # lm-eval's

    argv = ["lm-eval", "--model_args", f"pretrained={tmp_path},routing=nonsense", "--tasks", BLIMP]
    assert main(argv) == 2
    assert "error: Unknown routing method 'nonsense'. Known:" in capsys.readouterr().err

    assert main(["lm-eval", "ls", "groups"]) == 0
    assert "blimp_local" in capsys.readouterr().out

    (tmp_path / "mine.yaml").write_text("task: my_own_task\ndataset_path: json\noutput_type: loglikelihood\n")
    assert main(["lm-eval", "ls", "tasks", "--include_path", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert "my_own_task" in listed and "wikitext2_local" in listed  # the user's path is kept, ours added


def test_evaluate_lm_eval_on_a_patched_model_in_memory(mixtral_dir, data):
    from transformers import AutoTokenizer

    from hf_moe_routing.integrations.lm_eval import evaluate_lm_eval

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    patch_model(model, TopKConfig(top_k=1))
    tokenizer = AutoTokenizer.from_pretrained(mixtral_dir)
    results = evaluate_lm_eval(
        model, [BLIMP], tokenizer=tokenizer, data_dir=data, include_defaults=False, limit=2, bootstrap_iters=0
    )
    assert results["config"]["routing_stats"]["routing_config"] == TopKConfig(top_k=1).to_dict()
    assert results["config"]["routing_stats"]["mean_activated"] == pytest.approx(1.0)
    _check_blimp_against_model(results, mixtral_dir, TopKConfig(top_k=1))


def test_flops_sequence_length_is_the_token_weighted_mean_length():
    from hf_moe_routing.integrations.lm_eval import HFMoERoutingLM

    lm = HFMoERoutingLM.__new__(HFMoERoutingLM)  # only the position counters, no model
    lm._positions = lm._positions_sq = 0
    lm._measuring = True
    lm._count_positions(torch.zeros(1, 10, dtype=torch.long))
    lm._count_positions(torch.zeros(2, 30, dtype=torch.long))
    assert lm.mean_seq_len == round((10 * 10 + 2 * 30 * 30) / (10 + 2 * 30))  # sum L^2 / sum L


def test_without_lm_eval_nothing_is_registered_and_the_cli_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from hf_moe_routing.integrations import register_lm_eval

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a)
    )
    assert register_lm_eval() is False
    assert main(["lm-eval", "--tasks", BLIMP]) == 2
    assert "pip install 'hf-moe-routing[eval]'" in capsys.readouterr().err


def test_routing_on_top_of_a_peft_lora_adapter(mixtral_dir, tasks, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "lora")
    results = _evaluate(
        mixtral_dir, tasks, f"peft={tmp_path / 'lora'},routing=topk,routing_top_k=1", [BLIMP], 2
    )
    stats = results["config"]["routing_stats"]
    assert stats["routing_config"] == TopKConfig(top_k=1).to_dict() and stats[
        "mean_activated"
    ] == pytest.approx(1)
    assert stats["flops_reduction"] > 0


def test_batch_size_probes_are_not_counted(mixtral_dir, caplog):
    from hf_moe_routing.integrations.lm_eval import HFMoERoutingLM

    lm = HFMoERoutingLM(pretrained=str(mixtral_dir), batch_size="auto", max_batch_size=2, device="cpu")
    assert lm.routing_report()["num_tokens"] == 0 and lm._positions == 0
    assert "batch_size=auto" in caplog.text and "padding" in caplog.text  # the exactness warning
    lm._detect_batch_size()  # probing again later (batch_size auto:N) is not counted either
    assert lm.routing_report()["num_tokens"] == 0 and lm._positions == 0


def test_cli_with_an_lm_eval_yaml_config(mixtral_dir, data, cli_tasks_only_ours, capsys, tmp_path):
    config = {
        "model_args": {"pretrained": str(mixtral_dir), "routing": "topk", "routing_top_k": 1},
        "tasks": [BLIMP],
        "limit": 2,
        "device": "cpu",
        "metadata": {"data_dir": str(data)},
    }
    (tmp_path / "eval.yaml").write_text(json.dumps(config))  # JSON is YAML
    assert main(["lm-eval", "--config", str(tmp_path / "eval.yaml")]) == 0
    printed = capsys.readouterr().out
    assert f"|{BLIMP}" in printed and "topk(top_k=1)" in printed  # our model by default, routing table


@pytest.mark.parametrize("family", REQUIRED_FAMILIES + GENERIC_FAMILIES)
def test_routing_report_for_every_family(family):
    from hf_moe_routing.integrations.lm_eval import HFMoERoutingLM

    tokenizer = train_tokenizer(["a b c d e f g h"], vocab_size=16, kind="word", min_frequency=1)
    model = tiny_model(family)
    lm = HFMoERoutingLM(pretrained=model, tokenizer=tokenizer, routing="topk", routing_top_k=1)
    lm._model_call(torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0)))
    report = lm.routing_report()
    moe_layers = len(report["activated_per_layer"])
    assert report["num_tokens"] == 12 and report["seq_len"] == 12 and moe_layers >= 1
    assert report["mean_activated"] == pytest.approx(1.0)
    assert 0 < report["flops_reduction"] < 1
    assert report["flops_per_token"]["routed_experts"] == pytest.approx(
        report["flops_per_token_topk"]["routed_experts"] / report["top_k"]
    )


def test_without_a_device_the_model_runs_where_torch_can(mixtral_dir, monkeypatch):
    """lm-eval's HF model defaults to device="cuda"; on a CPU-only torch ours picks the CPU by itself."""
    from hf_moe_routing.integrations.lm_eval import HFMoERoutingLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    lm = HFMoERoutingLM(pretrained=str(mixtral_dir), routing="topk", routing_top_k=1)
    assert str(lm.device) == "cpu" and next(lm.model.parameters()).device.type == "cpu"


def test_unknown_tasks_are_refused_before_the_model_loads(tmp_path):
    from hf_moe_routing.integrations.lm_eval import check_tasks, task_manager

    manager = task_manager(include_defaults=False)
    assert check_tasks([BLIMP, "blimp_local"], manager) is manager
    with pytest.raises(
        ValueError, match=r"Unknown lm-eval task\(s\) 'blimp_local_no_such'.*lm-eval ls tasks"
    ):
        check_tasks([BLIMP, "blimp_local_no_such"], manager)
