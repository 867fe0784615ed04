"""Floor 3 — models retrained on purpose, and the artifacts that hold them.

- :mod:`.protocol`: which subsets, queries and units a ground-truth protocol means;
- :mod:`.artifact`: opening and verifying a ground truth (:class:`GroundTruth`);
- :mod:`.builder`: building, resuming and repairing one; :mod:`.executors`: where its units run (local, Ray);
- :mod:`.reproduce`: retraining committed units and comparing them with the artifact and its seed noise;
- :mod:`.index`: the pinned root hash of every finished artifact;
- :mod:`.mislabel`: the corrupted-label models of mislabel detection;
- :mod:`.zoo`: explained models by seed, with per-epoch checkpoints.
"""

from .artifact import GroundTruth, build_command, current, gt_root, latest, load, root_hash, verify, versions
from .builder import Job, build, protocol_with, run_job, train_unit, unit_done
from .protocol import OUTPUT_ROWS, all_units, checkpoint_file, query_indices, subset_indices, unit_file
