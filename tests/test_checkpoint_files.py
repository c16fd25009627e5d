"""Reading weight files: torch's legacy format loads, a pickle of objects is refused without running it."""

import os
import pickle

import pytest
import torch

from vidlatent.checkpoint import ModelLoadError, load_state_dict


class _Runs:
    """Unpickling this would call os.mkdir: the marker folder appears only if code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_legacy_torch_file_loads(tmp_path):
    weights = {"w": torch.arange(6.0).view(2, 3)}
    torch.save(weights, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be mmapped
    loaded = load_state_dict(tmp_path / "legacy.pt")
    assert loaded.keys() == weights.keys() and torch.equal(loaded["w"], weights["w"])


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_pickle_of_objects_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    payload = {"w": torch.ones(1), "x": _Runs(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ModelLoadError, match="holds Python objects besides tensors, which are never loaded"):
        load_state_dict(path)
    assert not marker.exists()
