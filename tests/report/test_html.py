"""The HTML report escapes by construction: hostile text in every field of a run log, the lab's
results and a probe comes out as text, and in a real browser no injected script runs."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from curvscope.diagnosis import LogFormatError, read_log
from curvscope.report import html as report
from tests.browser import needs_chromium, probe_page

# each sets window.__pwned if it ever runs, as a script, a handler or markup
PAYLOADS = [
    "<script>window.__pwned = 1</script>",
    '<img src="x" onerror="window.__pwned = 1">',
    '"><svg onload="window.__pwned = 1">',
    "</td></table></style></title><script>window.__pwned = 1</script>",
    "' onmouseover='window.__pwned = 1",
]


def hostile_lines() -> list[dict]:
    """A Monitor log with a payload in every field, ``step`` and header keys included."""
    header = {
        "curvscope_log": 1,
        "version": PAYLOADS[0],
        "started": PAYLOADS[1],
        "optimizer": PAYLOADS[2],
        "every": PAYLOADS[3],
        PAYLOADS[4]: PAYLOADS[0],
    }
    records = [
        {
            "step": payload,
            "state": ("learning", "unstable")[i % 2],
            "advice": [payload, PAYLOADS[(i + 1) % len(PAYLOADS)]],
            "reasons": [payload],
            "loss": 1.0 / (i + 1),
            "grad_norm": 0.5,
            "sharpness": 2.0,
            "stability_limit": 4.0,
            "optimizer": payload,
            "layer_shares": {payload: 1.0},
            payload: payload,
        }
        for i, payload in enumerate(PAYLOADS)
    ]
    return [header, *records]


def visible(html: str) -> str:
    """The page's text as a browser shows it: tags dropped, entities decoded."""
    import html as h

    html = re.sub(r'src="data:image/png;base64,[^"]*"', "", html)
    return h.unescape(re.sub(r"<[^>]+>", " ", html))


class _Tags(HTMLParser):
    """Every element and attribute of a page, as a browser's parser sees them."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))


# what the templates write, and nothing else
OUR_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table"}
OUR_TAGS |= {"tr", "th", "td", "figure", "img", "figcaption", "details", "summary", "dl", "dt"}
OUR_TAGS |= {"dd", "ul", "li", "b"}


def assert_inert(html: str) -> None:
    """No payload survived as markup: only the templates' elements, no event handler, no
    script, and the only images are our embedded plots."""
    tags = _Tags(html).tags
    assert {t for t, _ in tags} <= OUR_TAGS
    assert not [(t, a) for t, attrs in tags for a, _ in attrs if a.startswith("on")]
    srcs = [dict(attrs).get("src") or "" for t, attrs in tags if t == "img"]
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


def test_log_report_escapes_every_field(tmp_path):
    """The issue's case: a log's ``step`` reached report.html unescaped. Rendered straight from
    the lines (as the old reader let them through), every field is text."""
    lines = hostile_lines()
    path = report.write_log_report(lines[0], lines[1:], tmp_path)
    html = path.read_text(encoding="utf-8")
    assert_inert(html)
    text = visible(html)
    for payload in PAYLOADS:
        assert payload in text  # shown to the reader, as text
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in html


def test_read_log_refuses_the_hostile_step_and_the_report_escapes_what_it_accepts(tmp_path):
    lines = hostile_lines()
    log = tmp_path / "hostile.jsonl"
    log.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    with pytest.raises(LogFormatError, match=r"line 2: 'step' must be a non-negative integer"):
        read_log(log)
    for i, record in enumerate(lines[1:]):
        record["step"] = 10 * (i + 1)
    log.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    header, records = read_log(log)
    html = report.write_log_report(header, records, tmp_path / "r").read_text(encoding="utf-8")
    assert_inert(html)
    assert all(p in visible(html) for p in PAYLOADS)


def test_log_report_says_when_records_were_lost(tmp_path):
    lines = hostile_lines()[1:3]
    lines[1]["records_lost"] = 2
    html = report.write_log_report({}, lines, tmp_path).read_text(encoding="utf-8")
    assert "2 probe record(s) could not be written" in html


def test_lab_and_probe_reports_escape_their_text(tmp_path):
    run = {
        "problem": PAYLOADS[0],
        "optimizer": PAYLOADS[1],
        "outcome": PAYLOADS[2],
        "steps": PAYLOADS[3],
        "final_loss": PAYLOADS[4],
        "final_grad_norm": 1.0,
        "gradients": PAYLOADS[0],
        "products": 0,
        "wall": 0.1,
        "note": PAYLOADS[4],  # a run's note (a stop by the time budget) is shown, as text
    }
    table = report.runs_table([run])
    html = report.page(PAYLOADS[3], table)
    assert_inert(html)
    assert all(p in visible(html) for p in PAYLOADS)
    assert "<table>" in html  # the template's own markup is kept
    # a plain string body is text, not markup
    assert "&lt;b&gt;" in report.page("t", "<b>bold</b>")
    # the probe report
    result = {"text": PAYLOADS[0], "advice": PAYLOADS[1:], "slices": {}}
    html = report.write_probe_report(result, tmp_path).read_text(encoding="utf-8")
    assert_inert(html)
    assert all(p in visible(html) for p in PAYLOADS)


def test_templates_escape_by_construction():
    """Autoescaping is on, and no template opts out of it."""
    env = report.environment()
    assert env.autoescape is True
    folder = Path(report.__file__).parent / "templates"
    sources = {p.name: p.read_text() for p in folder.glob("*.html")}
    assert {"base.html", "lab.html", "log.html", "probe.html", "macros.html"} <= set(sources)
    for name, source in sources.items():
        assert not re.search(r"\|\s*safe|autoescape\s+false|Markup", source), name
    # and a missing value is an error, never an empty cell
    with pytest.raises(Exception, match="undefined"):
        report.render("probe.html", title="t")


@needs_chromium
def test_no_injected_script_runs_in_a_real_browser(tmp_path):
    lines = hostile_lines()
    page = report.write_log_report(lines[0], lines[1:], tmp_path)
    script = (
        "document.title = [window.__pwned === undefined, document.scripts.length,"
        " [...document.querySelectorAll('*')].filter(e => [...e.attributes].some("
        "a => a.name.startsWith('on'))).length,"
        " document.querySelectorAll('svg').length,"
        " [...document.images].every(i => i.complete && i.naturalWidth > 0),"
        " document.body.innerText.includes('<script>window.__pwned = 1<\\/script>')].join('|')"
    )
    title, console = probe_page(page, script, tmp_path)
    safe, scripts, handlers, svgs, images_ok, shown = title.split("|")
    assert safe == "true"  # no payload ran
    assert scripts == "1"  # only the probe itself
    assert handlers == "0" and svgs == "0"
    assert images_ok == "true" and shown == "true"  # the report works and shows the text
    assert not console  # no script error, no message at all


def test_log_report_says_which_probes_measured_the_model_in_eval_mode(tmp_path):
    """A probe measures the model in the mode it finds: a loop that evaluates and forgets
    model.train() gets eval-mode curvature, which the page now says, with the steps."""
    lines = [{"step": s, "state": "learning", "train_mode": s != 20} for s in (10, 20, 30)]
    html = report.write_log_report({}, lines, tmp_path / "a").read_text(encoding="utf-8")
    assert "1 of the 3 probes (steps 20) found the model in eval mode" in html
    for line in lines:
        line["train_mode"] = False
    html = report.write_log_report({}, lines, tmp_path / "b").read_text(encoding="utf-8")
    assert "Every probe found the model in eval mode" in html
    for line in lines:
        line["train_mode"] = True
    html = report.write_log_report({}, lines, tmp_path / "c").read_text(encoding="utf-8")
    assert "eval mode" not in html


def test_log_report_says_how_much_clipping_took(tmp_path):
    """A clipped run's page says the range of its clip factors, and the probes that had none."""
    header = {"curvscope_log": 1, "max_grad_norm": 0.05}
    records = [
        {"step": 5, "state": "learning"},
        {"step": 10, "state": "learning", "clip_factor": 0.25, "clip_norms": 5},
        {"step": 15, "state": "unstable", "clip_factor": 0.5, "clip_norms": 5},
        {"step": 20, "state": "unstable", "clip_factor": 0.5, "clip_norms": 0},
    ]
    html = report.write_log_report(header, records, tmp_path / "a").read_text(encoding="utf-8")
    assert "Gradient clipping to a norm of 0.05: the steps took 0.25 to 0.5" in html
    assert "1 probe(s) had no gradient norm" in html
    assert "1 probe(s) had no norm in their window and took the latest earlier one" in html
    bare = [{"step": 5, "state": "learning"}]
    html = report.write_log_report(header, bare, tmp_path / "b").read_text(encoding="utf-8")
    assert "no probe had a gradient norm to go by" in html
    html = report.write_log_report({}, records, tmp_path / "c").read_text(encoding="utf-8")
    assert "Gradient clipping" not in html


def test_a_report_refuses_a_folder_that_holds_another_kinds(tmp_path):
    """`curvscope report log --out <a lab's folder>` replaced the lab's report.html and removed
    its results.json and plots as files of its own (an outside review). A folder keeps the kind
    of report it holds; a report of the same kind replaces its own files, as before."""
    lines = hostile_lines()[1:3]
    for i, r in enumerate(lines):
        r["step"] = i + 1
    (tmp_path / "results.json").write_text("{}", encoding="utf-8")
    (tmp_path / report.MANIFEST).write_text("#lab\nreport.html\nresults.json", encoding="utf-8")
    with pytest.raises(FileExistsError, match="holds a lab report"):
        report.write_log_report({}, lines, tmp_path)
    assert (tmp_path / "results.json").exists()
    other = tmp_path / "logs"
    report.write_log_report({}, lines, other)
    report.write_log_report({}, lines, other)  # its own kind: replaced
    assert (other / report.MANIFEST).read_text(encoding="utf-8").startswith("#log\n")
    with pytest.raises(FileExistsError, match="holds a run log's report"):
        report.write_probe_report({"text": "t", "advice": [], "slices": {}}, other)
    # a manifest from before it named its kind: a lab's, by its results.json
    (tmp_path / report.MANIFEST).write_text("report.html\nresults.json", encoding="utf-8")
    with pytest.raises(FileExistsError, match="holds a lab report"):
        report.write_log_report({}, lines, tmp_path)


def test_a_report_refuses_to_replace_files_no_report_of_curvscope_wrote(tmp_path):
    """A user's own report.html (or results.json) in --out was replaced by the lab's or a
    probe's without a word, where another report kind's was refused (an outside review).
    Without a manifest listing them, those files are the user's: refused, left as they were."""
    lines = hostile_lines()[1:3]
    for i, r in enumerate(lines):
        r["step"] = i + 1
    for name, write in (
        ("report.html", lambda: report.write_log_report({}, lines, tmp_path)),
        ("report.html", lambda: report.write_probe_report({"text": "t", "advice": []}, tmp_path)),
        ("results.json", lambda: report.write_lab({"problems": []}, tmp_path)),
    ):
        (tmp_path / name).write_text("mine", encoding="utf-8")
        with pytest.raises(FileExistsError, match=f"holds {name}, which curvscope did not"):
            write()
        assert (tmp_path / name).read_text(encoding="utf-8") == "mine"
        (tmp_path / name).unlink()


def test_a_report_refuses_to_replace_plots_no_report_of_curvscope_wrote(tmp_path):
    """A user's own log.png and layers.png were replaced by a run log's report, and a lab's
    profile.png by the lab (an outside review): only report.html and results.json were
    protected. A file of a name the report's plots take that no manifest lists is refused
    before anything is written; files of other names — another kind's plot names included (a
    run log's report refused a user's profile.png: a second review) — stay beside it."""
    lines = hostile_lines()[1:3]
    for i, r in enumerate(lines):
        r["step"] = i + 1
    (tmp_path / "log.png").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"holds log\.png, which curvscope did not"):
        report.write_log_report({}, lines, tmp_path)
    assert (tmp_path / "log.png").read_bytes() == b"mine"
    assert not (tmp_path / "report.html").exists()
    (tmp_path / "log.png").unlink()
    for name in ("profile.png", "curves-rosenbrock.png"):  # a lab's names
        (tmp_path / name).write_bytes(b"mine")
        with pytest.raises(FileExistsError, match=rf"holds .*{name}.*which curvscope did not"):
            report.claim_folder(tmp_path, "lab")
    (tmp_path / "photo.png").write_bytes(b"mine")
    report.write_log_report({}, lines, tmp_path)  # and again: its own plots are its to replace
    report.write_log_report({}, lines, tmp_path)
    for name in ("photo.png", "profile.png", "curves-rosenbrock.png"):
        assert (tmp_path / name).read_bytes() == b"mine"
    assert (tmp_path / "log.png").read_bytes()[:4] == b"\x89PNG"


def test_a_folder_from_before_manifests_keeps_the_users_files_and_its_kind(tmp_path):
    """A report folder from before manifests were kept (its page titled "curvscope ..."): the
    first plot listed every plot-named file, and the end of the report deleted the user's own
    log.png there; a run log's report replaced an old lab's page, leaving its results.json (a
    review). Its kind is read from its page's title; the user's files stay."""
    lines = hostile_lines()[1:3]
    for i, r in enumerate(lines):
        r["step"] = i + 1
    (tmp_path / "report.html").write_text("<title>curvscope run report</title>", "utf-8")
    (tmp_path / "curves-mine.png").write_bytes(b"mine")
    report.write_log_report({}, lines, tmp_path)
    assert (tmp_path / "curves-mine.png").read_bytes() == b"mine"
    old_lab = tmp_path / "lab"
    old_lab.mkdir()
    (old_lab / "report.html").write_text("<title>curvscope lab</title>", "utf-8")
    (old_lab / "results.json").write_text('{"problems": [], "environment": {}}', "utf-8")
    with pytest.raises(FileExistsError, match="holds a lab report"):
        report.write_log_report({}, lines, old_lab)


def test_a_report_cut_short_after_its_plots_can_be_rerun(tmp_path, monkeypatch):
    """Plots were listed in the manifest only once the page was written: a report cut short
    after them (a Ctrl-C, an error) left them unlisted, and its rerun was refused as replacing
    files curvscope had not written (a review)."""
    lines = hostile_lines()[1:3]
    for i, r in enumerate(lines):
        r["step"] = i + 1

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(report, "render", cut)
        with pytest.raises(KeyboardInterrupt):
            report.write_log_report({}, lines, tmp_path)
    assert (tmp_path / "log.png").exists() and not (tmp_path / "report.html").exists()
    report.write_log_report({}, lines, tmp_path)
    assert (tmp_path / "report.html").exists()


def test_long_layer_names_fit_the_legend_and_stay_apart():
    """A BERT's "model.encoder.layer.10.attention.self.query.weight" was cut at the image's
    edge, query, key and value alike (an outside review): the shared front is said once, as
    the legend's title, and what is left fits and tells the layers apart."""
    from curvscope.report.plots import LABEL_CHARS, _legend_labels

    names = [
        f"model.encoder.layer.{i}.attention.self.{k}.weight"
        for i in (10, 11)
        for k in ("query", "key", "value")
    ]
    prefix, labels = _legend_labels([*names, "other (40 blocks)"])
    assert prefix == "model.encoder.layer."
    assert labels[0] == "10.attention.self.query.weight" and labels[-1] == "other (40 blocks)"
    assert len(set(labels)) == len(labels) and max(map(len, labels)) <= LABEL_CHARS
    assert _legend_labels(["0.weight", "2.weight"]) == ("", ["0.weight", "2.weight"])
    long_head = ["a" * 40 + ".block.weight", "b" * 40 + ".block.weight"]
    _, labels = _legend_labels(long_head)
    assert max(map(len, labels)) <= LABEL_CHARS  # a long first component: the end alone


def test_a_lab_whose_runs_were_all_skipped_draws_no_empty_plots(tmp_path, capsys):
    """Dense Newton is skipped above 600 parameters: a lab of that alone drew three empty
    convergence axes with an empty legend box and a "Diagnosis at the end of each run" heading
    with nothing under it (an outside review)."""
    from curvscope.cli import main

    out = tmp_path / "lab"
    argv = ["lab", "--quick", "--problems", "digits-mlp", "--optimizers", "newton", "--out"]
    assert main([*argv, str(out)]) == 0
    assert not (out / "curves-digits-mlp.png").exists()
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Diagnosis at the end" not in page and ">nan<" not in page  # ‖g‖ of a skipped run
