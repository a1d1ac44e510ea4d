"""The app's model panel (choose, plan, load, unload), chats as files, head guides and the memory chart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("transformers")

from helpers import make_checkpoint  # noqa: E402  (tests/ is on sys.path)
from neoxlite.app import chats, models  # noqa: E402
from neoxlite.app.cli import launch  # noqa: E402
from neoxlite.app.engine import Engine, tier_usage  # noqa: E402
from neoxlite.app.heads import guide  # noqa: E402
from neoxlite.app.screenshot import CHROMIUM, free_port, tour  # noqa: E402
from neoxlite.app.ui import _unfenced, shown, tier_chart_html  # noqa: E402
from test_app import SENTIMENT, TOKEN_TYPES, TOKENIZER, make_head_checkpoint  # noqa: E402

from neoxlite.demo import demo_path  # noqa: E402

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("app_models")
    return {
        "chat": make_head_checkpoint(root / "lm", "GPTNeoXForCausalLM"),
        "second": make_head_checkpoint(root / "second-lm", "GPTNeoXForCausalLM", seed=1),
        "classify": make_head_checkpoint(root / "cls", "GPTNeoXForSequenceClassification", id2label=SENTIMENT),
        "tag": make_head_checkpoint(root / "tok", "GPTNeoXForTokenClassification", id2label=TOKEN_TYPES),
    }


@pytest.fixture(scope="module")
def url(folders) -> str:
    demo, url = launch(folders["chat"], [folders["classify"], folders["tag"]], port=free_port(), block=False)
    yield url
    demo.close()


def client(url: str):
    return gradio_client.Client(url, verbose=False)


# --- through the running app ------------------------------------------------------------------------------

def test_model_panel_endpoints_name_checkpoints_without_paths(url, folders):
    names = client(url).predict(api_name="/models")
    assert names[:3] == ["lm", "cls", "tok"]  # what the app started with, by folder name
    assert "demo" in names and "demo/question-answering" in names
    assert not [n for n in names if n.startswith("/") or str(folders["chat"].parent) in n]
    plan = client(url).predict("lm", "none", "", "", "", api_name="/plan")
    assert plan.startswith("lm: 4 blocks") and "compute on: CPU" in plan and "kv_cache" in plan
    assert str(folders["chat"]) not in plan
    with pytest.raises(gradio_client.exceptions.AppError, match="cpu_memory"):
        client(url).predict("lm", "none", "", "lots", "", api_name="/plan")


def test_loading_a_checkpoint_replaces_the_model_for_its_task(url, folders):
    c = client(url)

    def fresh_reply() -> str:  # a new session each time: no history
        return client(url).predict("apples", **GREEDY, api_name="/chat")

    before = fresh_reply()
    status = c.predict(str(folders["second"]), "none", "", "", "", api_name="/load")
    assert status.startswith("Loaded `second-lm` for chat in") and "(4 blocks)" in status
    assert fresh_reply() != before  # other weights, same greedy prompt
    memory, _ = c.predict(api_name="/memory")
    assert "`second-lm`: ready" in memory and "`lm`" not in memory
    assert c.predict("positive words", api_name="/classify")["label"] in SENTIMENT.values()  # heads untouched
    assert c.predict("chat", api_name="/unload") == "Unloaded the chat model."
    with pytest.raises(gradio_client.exceptions.AppError, match="no chat model is loaded.*Models tab"):
        c.predict("apples", **GREEDY, api_name="/chat")
    with pytest.raises(gradio_client.exceptions.AppError, match="no chat model is loaded"):
        c.predict("chat", api_name="/unload")
    assert c.predict("lm", "none", "", "", "", api_name="/load").startswith("Loaded `lm` for chat")
    assert fresh_reply() == before
    with pytest.raises(gradio_client.exceptions.AppError, match="does not exist"):
        c.predict("./no/such/folder", "none", "", "", "", api_name="/load")
    assert fresh_reply() == before  # a failed load leaves the others be


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium "
                    "(scripts/test.sh installs it)")
def test_browser_loads_chats_reloads_exports_and_shows_every_tab(folders, tmp_path):
    pytest.importorskip("playwright.sync_api")
    demo, url = launch(folders["chat"], [folders["classify"], folders["tag"]], port=free_port(), block=False)
    try:
        result = tour(url, tmp_path, message="Hello there", load=str(folders["second"]), edit="Goodbye")
    finally:
        demo.close()
    assert result.loaded.startswith("Loaded second-lm for chat"), result.loaded
    assert result.reply and result.after_reload == ["Hello there", result.reply]  # the chat survived the reload
    exported = json.loads(result.exported)
    assert [m["role"] for m in exported] == ["user", "assistant"] and exported[0]["content"] == "Hello there"
    assert exported[1]["content"].strip() == result.reply
    assert len(result.after_edit) == 2 and result.after_edit[0] == "Goodbye"  # edited, and answered again
    assert result.after_import == result.after_reload  # the export, imported back
    assert result.checkpoint_field == "second-lm"  # the typed folder, now named by its name
    assert set(result.screenshots) == {"chat", "classify", "tag", "models", "memory"}  # no QA head: no QA tab
    assert all(path.stat().st_size > 10_000 for path in result.screenshots.values())


# --- loading frees the model it replaces -------------------------------------------------------------------

def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_loading_b_gives_back_a_s_memory(tmp_path):
    big = {"vocab_size": 8192, "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
           "intermediate_size": 2048, "max_position_embeddings": 256}
    for name, seed in (("a", 0), ("b", 1)):
        make_checkpoint(tmp_path / name, "GPTNeoXForCausalLM", seed=seed, shard_kb=None, **big)
        shutil.copy(TOKENIZER / "tokenizer.json", tmp_path / name / "tokenizer.json")
    engine = Engine.from_paths(tmp_path / "a")
    engine.load()
    size = sum(engine.models["chat"].block_sizes().values())  # ~100 MiB each in float32
    with_a = _rss()
    engine.load_checkpoint(tmp_path / "b", {"device": "cpu"})
    with_b = _rss()
    assert engine.sources["chat"].name == "b"
    assert with_b - with_a < size / 2, f"RSS grew by {(with_b - with_a) / 2**20:.0f} MiB loading B in place of A"
    engine.unload("chat")
    assert with_b - _rss() > size / 2, "unloading B gave back less than half its size"


# --- pieces without a server -------------------------------------------------------------------------------

def test_chat_files_round_trip_and_refuse_what_is_not_a_chat():
    history = [{"role": "user", "content": "def f():"}, {"role": "assistant", "content": "    return 1\n"}]
    text = chats.to_json("Be brief.", history)
    assert json.loads(text)[0] == {"role": "system", "content": "Be brief."}
    assert chats.from_json(text) == ("Be brief.", history)
    assert chats.from_json(json.dumps({"messages": history})) == ("", history)
    markdown = chats.to_markdown("Be brief.", history)
    assert "**System:** Be brief." in markdown and "### Assistant\n\n    return 1\n" in markdown
    for bad, message in (("{", "not JSON"), ('{"a": 1}', "must hold a list"),
                         ('[{"role": "robot", "content": "x"}]', "message 0 is not"),
                         ('[{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]', "after the")):
        with pytest.raises(ValueError, match=message):
            chats.from_json(bad)


def test_message_views():
    history = [{"role": "user", "content": "def f():"}, {"role": "assistant", "content": "    return 1"}]
    assert [m["content"]["text"] for m in shown(history, "Markdown")] == ["def f():", "    return 1"]
    code = [m["content"]["text"] for m in shown(history, "Python code")]
    assert code == ["```python\ndef f():\n```", "```python\n    return 1\n```"]
    assert _unfenced(code[1]) == "    return 1"  # an edit made in the code view comes back without fences
    assert _unfenced("plain") == "plain"


def test_head_guides_come_from_id2label_and_the_model_card(tmp_path):
    demo_tag = guide(demo_path("token-classification"), {0: "WHITESPACE", 1: "NAME"}, "tag")
    assert demo_tag.labels.startswith("Labels: `WHITESPACE`, `NAME`. The type Python's own `tokenize`")
    assert demo_tag.examples[0] == ['if count > 10:  # too many\n    return "full"']
    qa = guide(demo_path("question-answering"), None, "answer")
    assert qa.examples[0] == ["What does area return?", "def area(width, height):\n    return width * height"]
    bare = guide(tmp_path, {1: "positive", 0: "negative"}, "classify")  # no model card
    assert bare.labels == "Labels: `negative`, `positive`." and bare.examples == []


def test_display_names_and_the_hub_cache(tmp_path):
    snapshot = tmp_path / "hub/models--EleutherAI--pythia-70m/snapshots/abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    (tmp_path / "hub/models--EleutherAI--pythia-70m/refs").mkdir()
    (tmp_path / "hub/models--EleutherAI--pythia-70m/refs/main").write_text("abc123")
    other = tmp_path / "hub/models--gpt2--gpt2/snapshots/def456"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert models.display_name(snapshot) == "EleutherAI/pythia-70m"
    assert models.display_name("EleutherAI/pythia-160m") == "EleutherAI/pythia-160m"
    assert models.display_name(demo_path()) == "demo"
    assert models.display_name(tmp_path) == tmp_path.name
    found = models.cached_choices(tmp_path / "hub")
    assert [(c.name, c.location) for c in found] == [("EleutherAI/pythia-70m", "EleutherAI/pythia-70m")]
    assert models.cached_choices(tmp_path / "nothing-here") == []
    with pytest.raises(ValueError, match="gpu_memory"):
        models.load_options("nf4", "plenty", "", "")
    assert models.load_options("none", "", " 2GiB ", "", device="cpu") == {"cpu_memory": "2GiB", "device": "cpu"}


def test_memory_chart_follows_the_offload_plan(folders, tmp_path):
    from neoxlite import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(folders["chat"], cpu_memory="10MiB", offload_dir=tmp_path,
                                               max_context=64, progress=False)
    plan = model.offload_plan
    tiers = {t.tier: t for t in tier_usage([model])}
    assert set(tiers) == {"RAM", "disk"}
    assert tiers["RAM"].used == plan.tier_bytes("cpu") and tiers["RAM"].budget == 10 * 2**20
    assert tiers["disk"].used == plan.tier_bytes("disk") > 0 and tiers["disk"].free > 0
    chart = tier_chart_html(list(tiers.values()))
    assert chart.count('class="track"') == 2 and "of 10.0 MiB budget" in chart
