from auraserve.core.jobs import JobStatus
from auraserve.core.presets import default_presets
from auraserve.core.request import build_request
from auraserve.store import jobs, keys, ledger
from auraserve.store.db import Store
from tests.store_jobs import submit_one

PRESET = default_presets()["auraflow-v0-3-512"]


def _req(prompt: str = "a cat", **kw: object):
    return build_request({"prompt": prompt, **kw}, model="auraflow-v0-3-512", preset=PRESET)


def test_submit_claim_complete_captures(db: Store) -> None:
    acct = keys.create_account(db, "a", credits=1000)
    req = _req()
    price = req.price(PRESET)
    sub = submit_one(
        db, account_id=acct.account_id, request=req, price=price, max_queued=10, max_attempts=3
    )
    assert sub.balance == 1000 - price
    assert sub.job.status == JobStatus.QUEUED
    claimed = jobs.claim(
        db, worker_id="w1", models=["auraflow-v0-3-512"], max_images=4, lease_seconds=30
    )
    assert [j.id for j in claimed] == [sub.job.id]
    done = jobs.complete(
        db, worker_id="w1", job_id=sub.job.id, output={"media": []}, engine_seconds=0.1
    )
    assert done is not None and done.status == JobStatus.COMPLETED
    assert ledger.balance(db, acct.account_id) == 1000 - price
    kinds = [e["kind"] for e in ledger.entries(db, acct.account_id)]
    assert kinds == ["grant", "reserve", "capture"]
    # A second completion (e.g. a presumed-dead worker) is fenced out and charges nothing.
    assert (
        jobs.complete(
            db, worker_id="w1", job_id=sub.job.id, output={"media": []}, engine_seconds=0.1
        )
        is None
    )
    assert [e["kind"] for e in ledger.entries(db, acct.account_id)] == [
        "grant",
        "reserve",
        "capture",
    ]


def test_only_a_hash_of_the_key_is_stored(db: Store) -> None:
    from sqlalchemy import text

    created = keys.create_account(db, "h", credits=1)
    with db.read() as conn:
        dump = " ".join(str(v) for row in conn.execute(text("SELECT * FROM api_keys")) for v in row)
    secret = created.key.split("_", 2)[2]
    assert secret not in dump and created.key not in dump
    assert keys.authenticate(db, created.key) is not None
    assert keys.authenticate(db, created.key + "x") is None
