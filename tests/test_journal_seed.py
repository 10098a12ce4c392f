"""The seed walkthrough (seeds/000: "Orchestrating 5 AI agents") end to end: five agents, each a separate `pd`
process in its own worktree, with no ids typed after registration."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from conftest import linked_worktree

AGENTS = {
    "database-builder": ("payments:db", "Payment system schema", ["supabase/migrations/*"]),
    "backend-builder": ("payments:api", "Building payment API",
                        ["src/api/payments/*", "src/types/Payment.ts", "src/middleware/auth.ts"]),
    "frontend-builder": ("payments:web", "Building checkout UI",
                         ["src/components/checkout/*", "src/pages/checkout.tsx", "src/hooks/usePayment.ts"]),
    "tester": ("payments:tests", "Payment integration tests", ["tests/payments/*"]),
    "auth-agent": ("payments:auth", "OAuth integration", []),
}  # fmt: skip
NOTES = {
    "database-builder": ["Creating payments table, webhook_requests, refunds", "Schema ready"],
    "backend-builder": ["Created POST /api/payments endpoint", "TypeScript types ready at src/types/Payment.ts"],
    "frontend-builder": ["Installed Stripe React library", "Built CheckoutForm component"],
    "tester": ["Waiting on the API"],
}


def _worktrees(root: Path) -> dict[str, Path]:
    return {name: linked_worktree(root, name) for name in AGENTS}  # one repository, a worktree per agent


def test_five_agents_walk_through_the_seed(daemon_factory, tmp_path: Path) -> None:
    d = daemon_factory(PORT_DADDY_STALE_AFTER="3s", PORT_DADDY_DEAD_AFTER="5s")
    trees = _worktrees(tmp_path)

    def pd(agent: str, *args: str):
        return d.pd(*args, cwd=trees[agent])

    for name, (identity, purpose, _) in AGENTS.items():
        r = pd(name, "agent", "register", "--agent", name, "--identity", identity, "--purpose", purpose, "--type", "ai")
        assert r.returncode == 0 and f"Registered agent: {name}" in r.stdout, r.stderr
    for name, (_, purpose, files) in AGENTS.items():
        if files:
            r = pd(name, "session", "start", purpose, "--files", *files)
            assert r.returncode == 0 and "Started session: session-" in r.stdout, r.stderr
            assert json.loads((trees[name] / ".portdaddy" / "current.json").read_text())["agentId"] == name

    # Notes from four agents at once, each its own process; every one lands in its own agent's session.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda item: [pd(item[0], "note", text) for text in item[1]], NOTES.items()))
    assert all(r.returncode == 0 for rs in results for r in rs)
    r = pd("backend-builder", "note", "Integrated Stripe API client", "--type", "commit")
    assert r.returncode == 0, r.stderr

    timeline = pd("tester", "notes", "--limit", "20").stdout.splitlines()
    assert timeline[0] == "[backend-builder] [commit] Integrated Stripe API client"
    for name, texts in NOTES.items():
        lines = [timeline.index(f"[{name}] {t}") for t in texts]
        assert lines == sorted(lines, reverse=True), "newest first"
    assert len(timeline) == 1 + sum(map(len, NOTES.values()))

    # Agent 5 tries to claim a file Agent 2 is working on: refused, then forced with the warning still shown.
    refused = pd("auth-agent", "session", "start", "OAuth integration", "--files", "src/middleware/auth.ts")
    assert refused.returncode == 1
    assert "Warning: src/middleware/auth.ts claimed by session-" in refused.stderr
    assert "(backend-builder: Building payment API)" in refused.stderr
    assert "Use --force to claim anyway" in refused.stderr
    assert "sessionId" not in json.loads((trees["auth-agent"] / ".portdaddy" / "current.json").read_text())
    forced = pd("auth-agent", "session", "start", "OAuth integration", "--files", "src/middleware/auth.ts", "--force")
    assert forced.returncode == 0 and "Warning: src/middleware/auth.ts claimed by session-" in forced.stderr
    # A glob claim covers the files under it, in both directions.
    glob = pd("tester", "session", "files", "claim", "src/components/checkout/Form.tsx")
    assert glob.returncode == 1 and "overlaps src/components/checkout/*" in glob.stderr

    # database-builder stops; the others keep heartbeating until it is declared dead.
    deadline = time.monotonic() + 30
    while True:
        for name in AGENTS:
            if name != "database-builder":
                assert pd(name, "agent", "heartbeat").returncode == 0
        listing = pd("tester", "agents").stdout
        if "Dead   database-builder (payments:db," in listing:
            break
        assert time.monotonic() < deadline, listing
        time.sleep(0.3)
    for name, (identity, *_) in AGENTS.items():
        if name != "database-builder":
            assert f"Active {name} ({identity}," in listing

    assert "warning:  1 dead agent left work behind: see pd salvage" in pd("tester", "status").stdout
    salvage = pd("tester", "salvage", "--project", "payments")
    assert salvage.returncode == 0
    assert "database-builder (pending" in salvage.stdout and "Payment system schema" in salvage.stdout
    assert "Schema ready" in salvage.stdout and "supabase/migrations/*" in salvage.stdout
    assert "No agents awaiting salvage in other:*" in pd("tester", "salvage", "--project", "other").stdout

    claimed = pd("tester", "salvage", "claim", "database-builder")
    assert claimed.returncode == 0, claimed.stderr
    assert "Creating payments table, webhook_requests, refunds" in claimed.stdout
    # The tester is at work in a session already: the dead agent's files join it, rather than a second session.
    assert claimed.stdout.endswith("Continue with: pd session files claim 'supabase/migrations/*'\n"), claimed.stdout
    assert "No agents awaiting salvage" in pd("tester", "salvage", "--project", "payments").stdout
    entry = json.loads(pd("tester", "salvage", "--all", "--json").stdout)["agents"][0]
    assert (entry["id"], entry["status"], entry["claimedBy"]) == ("database-builder", "claimed", "tester")
    assert "database-builder" not in pd("tester", "agents").stdout  # gone once its work was taken over

    # The abandoned session's claim blocks nobody: the salvager takes the files over without --force.
    again = pd("tester", "session", "files", "claim", "supabase/migrations/*")
    assert again.returncode == 0 and "Warning" not in again.stderr, again.stderr
    assert pd("tester", "notes", "--verify").returncode == 0
