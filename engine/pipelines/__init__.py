"""The pipelines, chosen by a snapshot's model_index.json `_class_name`; never a silent fallback."""
from loaders import LoadError, Snapshot

from engine.pipelines import edit, edit_plus, generate, layered

PIPELINES = {s.class_name: s for s in (edit.SPEC, edit_plus.SPEC, generate.SPEC, layered.SPEC)}


def pipeline_for(snapshot):
    """The EditSpec of a snapshot (folder or Snapshot)."""
    snap = snapshot if isinstance(snapshot, Snapshot) else Snapshot(snapshot)
    name = snap.pipeline_class()
    if name not in PIPELINES:
        raise LoadError(f"{snap.root}: model_index.json names pipeline {name!r}; this engine runs "
                        f"{', '.join(PIPELINES)}")
    return PIPELINES[name]
