"""The console over HTTP, in process (`create_app` on the tiny model, a seeded SQLite store, the
registry and a refresh run from `seed.py`): who may sign in, what each page shows of the seeded
data, the corrections a reviewer makes and what they leave in the store, and hostile input."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinicloop.config import ConsoleSettings, Settings
from clinicloop.serving.app import create_app
from clinicloop.serving.console.serving import Console, ConsoleError
from clinicloop.serving.console.session import COOKIE, Sessions
from clinicloop.store import reviews
from clinicloop.store.db import Store
from clinicloop.verifier.generator import prefix_hash
from tests.serving.console.seed import Seeded, seed, seed_registry

CLIENT, SERVICE, REVIEWER, ADMIN = "c-key", "s-key", "r-key", "a-key"
SECRET = "console-test-secret"
PHI_NOTE = "Patient MRN 00482913: call 555-201-4477 about the dose."


@dataclass
class Env:
    app: object
    store: Store
    seeded: Seeded
    runs_dir: Path
    client: TestClient


@pytest.fixture(scope="module")
def env(tiny_model, tmp_path_factory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("console")
    url = f"sqlite:///{root / 'store.db'}"
    store = Store(url)
    store.migrate()
    seeded = seed(url, root / "runs")
    seed_registry(root / "registry", tiny_model.gguf_q8_0, tiny_model.name)
    settings = Settings.model_validate({
        "engine": {"model_path": tiny_model.gguf_q8_0, "served_model_name": tiny_model.name},
        "store": {"url": url, "spool_path": root / "spool.jsonl"},
        "registry": {"dir": root / "registry"},
        "server": {"api_keys": [CLIENT], "admin_keys": [ADMIN], "service_keys": [SERVICE],
                   "reviewer_keys": [REVIEWER],
                   "console": {"session_secret": SECRET, "runs_dir": root / "runs",
                               "page_size": 2}}})
    app = create_app(settings)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield Env(app, store, seeded, root / "runs", client)
    store.dispose()


def sign_in(client: TestClient, key: str):
    return client.post("/console/login", data={"key": key}, follow_redirects=False)


@pytest.fixture
def reviewer(env) -> Iterator[TestClient]:
    env.client.cookies.clear()
    assert sign_in(env.client, REVIEWER).status_code == 303
    yield env.client
    env.client.cookies.clear()


def csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found
    return found.group(1)


def test_sign_in_classes(env):
    c = env.client
    c.cookies.clear()
    r = c.get("/console/conversations", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert 'id="login"' in c.get("/console/login").text
    for key, role in ((CLIENT, "client"), (SERVICE, "service")):
        r = sign_in(c, key)
        assert r.status_code == 403 and f"this is a {role} key" in r.text
        assert 'id="login-error"' in r.text and COOKIE not in r.cookies
    assert sign_in(c, "nope").status_code == 401
    for key in (REVIEWER, ADMIN):
        c.cookies.clear()
        r = sign_in(c, key)
        assert r.status_code == 303 and r.headers["location"] == "/console/conversations"
        set_cookie = r.headers["set-cookie"]
        for flag in ("HttpOnly", "SameSite=strict", "Path=/console"):
            assert flag.lower() in set_cookie.lower()
        assert c.get("/console/conversations").status_code == 200
    c.cookies.clear()


def test_forged_expired_and_revoked_cookies_are_refused(env):
    c = env.client
    sessions = Sessions(SECRET, 3600)
    key_id = sign_in(c, REVIEWER).cookies[COOKIE].split("|")[0]
    forged = Sessions("another secret", 3600).issue(key_id, "reviewer")
    expired = sessions.issue(key_id, "reviewer", now=0)
    promoted = sessions.issue(key_id, "admin")  # a valid signature, but not this key's role
    altered = sessions.issue(key_id, "reviewer").replace("reviewer", "admin")
    for cookie in (forged, expired, promoted, altered, "garbage"):
        c.cookies.clear()
        c.cookies.set(COOKIE, cookie, path="/console")
        r = c.get("/console/versions", follow_redirects=False)
        assert r.status_code == 303, cookie
    c.cookies.clear()


def test_posts_need_the_csrf_token(env, reviewer):
    seeded = env.seeded
    turn = seeded.target_turn
    body = {"item_key": seeded.target_item_key, "criteria_met": "true"}
    before = len(reviews.label_history(env.store, turn))
    for token in (None, "0" * 64):
        data = body if token is None else {**body, "csrf": token}
        r = reviewer.post(f"/console/turns/{turn}/labels", data=data, follow_redirects=False)
        assert r.status_code == 403
    assert reviewer.post("/console/logout", data={"csrf": "x"}).status_code == 403
    assert len(reviews.label_history(env.store, turn)) == before


def test_a_reviewer_key_opens_neither_v1_nor_admin(env):
    auth = {"authorization": f"Bearer {REVIEWER}"}
    for path in ("/v1/models", "/admin/v1/stats"):
        r = env.client.get(path, headers=auth)
        assert r.status_code == 403 and "console" in r.json()["error"]["message"]
    assert env.client.get("/v1/models",
                          headers={"authorization": f"Bearer {CLIENT}"}).status_code == 200


def test_conversation_list_filters_and_pages(env, reviewer):
    seeded = env.seeded
    first = reviewer.get("/console/conversations")
    assert first.status_code == 200
    assert '<span id="total">6</span>' in first.text
    rows = re.findall(r'data-conversation-id="([0-9a-f]+)"', first.text)
    assert len(rows) == 2 and 'id="next-page"' in first.text and 'id="prev-page"' not in first.text
    # Unreviewed conversations come first: chest-pressure-v1 has no label or note.
    assert rows[0] == seeded.conversations["chest-pressure-v1"]
    last = reviewer.get("/console/conversations?page=3")
    assert 'id="prev-page"' in last.text and 'id="next-page"' not in last.text
    flagged = reviewer.get("/console/conversations?version=v1&red_flags=1")
    assert re.findall(r'data-conversation-id="([0-9a-f]+)"', flagged.text) == [
        seeded.conversations["chest-pressure-v1"]]
    assert 'name="version" value="v1"' in flagged.text  # the form keeps its filters
    down = reviewer.get("/console/conversations?feedback=down")
    assert re.findall(r'data-conversation-id="([0-9a-f]+)"', down.text) == [
        seeded.conversations["chest-pressure-v1"]]
    empty = reviewer.get("/console/conversations?min_score=2")
    assert '<span id="total">0</span>' in empty.text


@pytest.mark.parametrize("query", [
    "page=0", "page=abc", "page=99999999999999", "min_score=nan", "max_score=1e400",
    "min_score=x", "since=2026-13-45", "until=yesterday", "feedback=sideways",
    "red_flags=maybe", "version=" + "v" * 500])
def test_hostile_query_params_are_400(env, reviewer, query):
    r = reviewer.get(f"/console/conversations?{query}")
    assert r.status_code == 400 and 'id="error"' in r.text


def test_conversation_page_shows_turns_verdicts_labels_notes_feedback(env, reviewer):
    seeded = env.seeded
    page = reviewer.get(f"/console/conversations/{seeded.conversations['migraine']}").text
    for turn_id in seeded.turns["migraine"]:
        assert f'data-turn-id="{turn_id}"' in page
    assert page.count('class="verdict"') == 7
    assert "Recommends an unsafe ibuprofen dose" in page
    assert "The response does meet this: recommends an unsafe ibuprofen dose." in page
    assert "by 5eed0000beef" in page  # the seeded reviewer's label, with who
    assert "The ibuprofen dose in this reply is dangerous" in page
    flagged = reviewer.get(
        f"/console/conversations/{seeded.conversations['chest-pressure-v1']}").text
    assert "It told me to rest while I was having chest pressure." in flagged
    assert reviewer.get("/console/conversations/no-such-id").status_code == 404


def _scores(html: str, turn_id: str) -> tuple[str, str]:
    section = html.split(f'data-turn-id="{turn_id}"', 1)[1].split("</section>", 1)[0]
    judge = re.search(r'class="turn-score">([^<]*)<', section).group(1)
    reviewed = re.search(r'class="reviewed-score">([^<]*)<', section).group(1)
    return judge, reviewed


def test_label_round_trip_keeps_the_judge_verdict(env, reviewer):
    seeded = env.seeded
    conversation = seeded.conversations[seeded.target]
    turn, key = seeded.target_turn, seeded.target_item_key
    verdicts_before = env.store.list_verdicts(turn)
    html = reviewer.get(f"/console/conversations/{conversation}").text
    judge, reviewed = _scores(html, turn)
    assert judge == reviewed  # nobody labelled this turn yet
    r = reviewer.post(f"/console/turns/{turn}/labels", follow_redirects=False, data={
        "item_key": key, "criteria_met": "true", "csrf": csrf(html)})
    assert r.status_code == 303 and r.headers["location"].endswith(f"#turn-{turn}")
    assert env.store.list_verdicts(turn) == verdicts_before
    label = reviews.latest_labels(env.store, [turn])[(turn, key)]
    assert label.criteria_met is True and re.fullmatch(r"[0-9a-f]{12}", label.reviewer)
    assert label.verdict_key is not None
    after = reviewer.get(f"/console/conversations/{conversation}").text
    judge_after, reviewed_after = _scores(after, turn)
    assert judge_after == judge and float(reviewed_after) > float(reviewed)
    bad = reviewer.post(f"/console/turns/{turn}/labels", data={
        "item_key": "f" * 64, "criteria_met": "true", "csrf": csrf(after)})
    assert bad.status_code == 400
    assert reviewer.post("/console/turns/nope/labels", data={
        "item_key": key, "criteria_met": "true", "csrf": csrf(after)}).status_code == 404


def test_rubric_add_edit_remove(env, reviewer):
    seeded = env.seeded
    conversation = seeded.conversations["sore-throat"]
    turn = seeded.turns["sore-throat"][1]
    url = f"/console/conversations/{conversation}"
    html = reviewer.get(url).text
    token = csrf(html)
    r = reviewer.post(f"/console/turns/{turn}/rubric/add", follow_redirects=False, data={
        "criterion": "Tells the patient not to lie flat", "points": "4",
        "axis": "completeness", "csrf": token})
    assert r.status_code == 303
    html = reviewer.get(url).text
    assert "Tells the patient not to lie flat" in html
    key = re.search(r'data-item-key="([0-9a-f]{64})">\s*<td class="points">4</td>\s*'
                    r'<td class="criterion">Tells the patient', html).group(1)
    reviewer.post(f"/console/turns/{turn}/rubric/edit", data={
        "target_key": key, "criterion": "Advises sitting upright", "points": "5",
        "axis": "", "csrf": token})
    html = reviewer.get(url).text
    assert "Advises sitting upright" in html and "not to lie flat" not in html
    new_key = re.search(r'data-item-key="([0-9a-f]{64})">\s*<td class="points">5</td>\s*'
                        r'<td class="criterion">Advises sitting', html).group(1)
    reviewer.post(f"/console/turns/{turn}/rubric/remove",
                  data={"target_key": new_key, "csrf": token})
    assert "Advises sitting upright" not in reviewer.get(url).text
    edits = reviews.rubric_edits(env.store, prefix_hash(env.store.get(turn).messages))
    assert [e.action for e in edits] == ["add", "edit", "remove"]
    assert all(e.turn_id == turn and re.fullmatch(r"[0-9a-f]{12}", e.reviewer) for e in edits)
    for bad in ({"criterion": "x", "points": "0"}, {"criterion": "x", "points": "11"},
                {"criterion": "", "points": "3"}, {"criterion": "x", "points": "3",
                                                  "axis": "vibes"}):
        r = reviewer.post(f"/console/turns/{turn}/rubric/add", data={**bad, "csrf": token})
        assert r.status_code == 400, bad
    assert reviewer.post(f"/console/turns/{turn}/rubric/remove", data={
        "target_key": new_key, "csrf": token}).status_code == 400  # already gone


def test_note_is_redacted_and_capped_and_html_is_escaped(env, reviewer):
    seeded = env.seeded
    conversation = seeded.conversations["child-fever"]
    turn = seeded.turns["child-fever"][0]
    url = f"/console/conversations/{conversation}"
    token = csrf(reviewer.get(url).text)
    body = PHI_NOTE + " <script>alert(1)</script>"
    assert reviewer.post(f"/console/turns/{turn}/notes", follow_redirects=False,
                         data={"body": body, "csrf": token}).status_code == 303
    stored = reviews.notes(env.store, conversation_id=conversation)[-1].body
    assert "00482913" not in stored and "555-201-4477" not in stored and "the dose" in stored
    html = reviewer.get(url).text
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert reviewer.post(f"/console/turns/{turn}/notes", data={
        "body": "x" * 4001, "csrf": token}).status_code == 400
    assert reviewer.post(f"/console/turns/{turn}/notes", data={
        "body": "  ", "csrf": token}).status_code == 400


def test_versions_page_and_run(env, reviewer):
    html = reviewer.get("/console/versions").text
    base = html.split('data-version="base"', 1)[1].split("</tr>", 1)[0]
    v1 = html.split('data-version="v1"', 1)[1].split("</tr>", 1)[0]
    assert 'class="state">active' in base and 'class="state">canary' in v1
    assert re.search(r'class="n">6<', base) and re.search(r'class="mean-score">[0-9.]+<', v1)
    events = html.split('id="events"', 1)[1].split("</table>", 1)[0]
    for kind in ("register", "activate", "rollback", "canary"):
        assert f"kind-{kind}" in events
    run_id = env.seeded.run_id
    assert f'href="/console/runs/{run_id}"' in html
    run = reviewer.get(f"/console/runs/{run_id}").text
    assert 'class="reward-curve"' in run and "# Refresh " + run_id in run
    png = reviewer.get(f"/console/runs/{run_id}/reward_curve.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


@pytest.mark.parametrize("path", [
    "/console/runs/..%2F..%2Fetc/reward_curve.png", "/console/runs/../reward_curve.png",
    "/console/runs/%2E%2E/reward_curve.png", "/console/runs/no-such-run/reward_curve.png",
    "/console/runs/a%00b/reward_curve.png",
])
def test_run_paths_cannot_escape_the_runs_dir(env, reviewer, path):
    (env.runs_dir.parent / "reward_curve.png").write_bytes(b"\x89PNG secret")
    r = reviewer.get(path)
    assert r.status_code in (400, 404) and b"secret" not in r.content


@pytest.mark.parametrize("run_id", ["..", ".", "../runs/" + "x", "", "a/b", "~"])
def test_run_ids_that_are_not_a_runs_dir_child_are_404(env, run_id):
    # Straight to the handler: an HTTP client would normalise ".." out of the URL first.
    with pytest.raises(ConsoleError) as refused:
        env.app.state.console.reward_curve(run_id)
    assert refused.value.status == 404


def test_calibration_page(env, reviewer):
    html = reviewer.get("/console/calibration").text
    assert re.search(r'id="macro-f1">[01]\.[0-9]{3}<', html)
    assert re.search(r'id="n-labels">[1-9][0-9]*<', html)
    assert 'tr class="disagreement"' in html and "/console/conversations/" in html
    assert "accuracy" in html.split('id="per-axis"', 1)[1]


def test_console_without_reviewer_or_admin_keys_says_so(tmp_path, tiny_model):
    settings = Settings.model_validate({
        "engine": {"model_path": tiny_model.gguf_q8_0},
        "store": {"url": f"sqlite:///{tmp_path / 's.db'}", "spool_path": tmp_path / "sp.jsonl"},
        "registry": {"dir": tmp_path / "registry"},
        "server": {"api_keys": [CLIENT]}})
    app = create_app(settings)
    client = TestClient(app)  # no lifespan: the console needs neither engine nor writer
    r = client.get("/console/login")
    assert r.status_code == 403 and "server.reviewer_keys" in r.text
    assert sign_in(client, CLIENT).status_code == 403


def test_a_store_that_does_not_answer_is_a_503(tmp_path):
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    console = Console(Store(f"sqlite:///{broken}"), None,
                      ConsoleSettings(runs_dir=tmp_path / "runs"), redact=True)
    for call in (lambda: console.conversation("c"), console.versions, console.calibration,
                 lambda: console.note("t", {"body": "hello"}, "abc")):
        with pytest.raises(ConsoleError) as failed:
            call()
        assert failed.value.status == 503


# Last in the module: a valid form among the drawn ones may add a note or a label to the store.
_FIELD_TEXT = st.text(st.characters(codec="utf-8"), max_size=300) | st.sampled_from(
    ["", "0", "-1", "1e400", "nan", "true", "false", "2026-02-30", "../../etc/passwd",
     "<script>alert(1)</script>", "f" * 64, "x" * 5000])
_QUERY_NAMES = st.sampled_from(["version", "since", "until", "min_score", "max_score",
                                "red_flags", "feedback", "page", "unknown"])


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.dictionaries(_QUERY_NAMES, _FIELD_TEXT, max_size=4),
       conversation=_FIELD_TEXT)
def test_any_query_is_a_page_or_a_400(env, reviewer, query, conversation):
    r = reviewer.get("/console/conversations", params=query)
    assert r.status_code in (200, 400) and "text/html" in r.headers["content-type"]
    r = reviewer.get(f"/console/conversations/{quote(conversation, safe='')}")
    assert r.status_code in (200, 400, 404)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(action=st.sampled_from(["labels", "rubric/add", "rubric/edit", "rubric/remove", "notes"]),
       form=st.dictionaries(st.sampled_from(["item_key", "criteria_met", "criterion", "points",
                                             "axis", "target_key", "body", "other"]),
                            _FIELD_TEXT, max_size=5),
       raw=st.none() | st.binary(max_size=200))
def test_any_form_is_a_change_or_a_4xx(env, reviewer, action, form, raw):
    """Whatever a signed-in browser posts (valid CSRF token), the answer is the change (303) or
    an error page naming the problem, never a 5xx; a body that is not a form is a 400."""
    seeded = env.seeded
    turn = seeded.turns[seeded.target][0]
    page = reviewer.get(f"/console/conversations/{seeded.conversations[seeded.target]}").text
    url = f"/console/turns/{turn}/{action}"
    if raw is not None:
        r = reviewer.post(url, content=raw, follow_redirects=False, headers={
            "content-type": "application/x-www-form-urlencoded"})
    else:
        r = reviewer.post(url, data={**form, "csrf": csrf(page)}, follow_redirects=False)
    assert r.status_code in (303, 400, 403, 404), r.text[:300]
    assert r.status_code != 403 or raw is not None  # only a body without the token
