"""Start-up recovery: what a killed or crashed process left behind is put right before work starts.

* jobs left ``running`` go back to ``queued``: they resume from their first unwritten image,
  with the seeds fixed when they were queued;
* an image whose files were renamed into place but whose row was not yet marked ``done``
  is adopted (the PNG is renamed last, so its presence means both files are complete);
  an image reserved but not written keeps its index for the resumed job;
* temporary files of interrupted writes are deleted;
* every queued job goes back into the scheduler in its original order.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .jobs import JobState, check_transition
from .scheduling import FairQueue, QueuedJob
from .store import Store
from .views import now_iso
from .writer import ImageWriter

log = logging.getLogger(__name__)


def recover(store: Store, queue: FairQueue, writer: ImageWriter) -> int:
    """Put stored state right after a restart; returns how many jobs were queued again."""
    for job in store.list_jobs(states=[JobState.RUNNING]):
        new = check_transition(job.id, job.state, JobState.QUEUED)
        store.update_job(job.id, state=new.value)
        log.info("session=%s job=%s running -> queued (resumed after a restart)", job.session_id, job.id)
    folders: set[Path] = set()
    for img in store.list_images(state="writing"):
        path = Path(img.path)
        folders.add(path.parent)
        if path.exists():
            store.complete_image(img.id, now_iso())
            log.info("session=%s job=%s image %s recovered after a restart", img.session_id, img.job_id, path.name)
    queued = store.list_jobs(states=[JobState.QUEUED])
    for job in queued:
        session = store.get_session(job.session_id)
        if session is not None:
            folders.add(Path(session.folder))
        if job.id not in queue:
            queue.push(QueuedJob(job.id, job.user, job.model, job.priority, seq=job.seq), force=True)
    for folder in folders:
        n = writer.remove_temp_files(folder)
        if n:
            log.info("removed %d temporary file(s) left in %s", n, folder)
    return len(queued)
