"""The one MNIST reader of benchmarks/ (benchmarks.mnist): the four gzipped IDX files, a named reason when absent."""

import gzip

import pytest
import torch

from benchmarks import mnist


def _write_idx(path, values: torch.Tensor, image: bool) -> None:
    header = (0x0803 if image else 0x0801).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in values.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + values.to(torch.uint8).numpy().tobytes())


def _tiny_mnist(root, train: int = 3, test: int = 2):
    gen = torch.Generator().manual_seed(0)
    data = {"train_images": torch.randint(0, 256, (train, 28, 28), generator=gen),
            "train_labels": torch.randint(0, 10, (train,), generator=gen),
            "test_images": torch.randint(0, 256, (test, 28, 28), generator=gen),
            "test_labels": torch.randint(0, 10, (test,), generator=gen)}
    root.mkdir(parents=True, exist_ok=True)
    for field, values in data.items():
        _write_idx(root / mnist.FILES[field], values, image=field.endswith("images"))
    return data


def test_reads_the_four_files_as_grey_levels_and_labels(tmp_path):
    data = _tiny_mnist(tmp_path / "mnist")
    got = mnist.load(tmp_path / "mnist")
    assert got.train_images.shape == (3, 784) and got.test_images.shape == (2, 784)
    assert got.train_images.dtype == torch.float32 and got.train_labels.dtype == torch.int64
    torch.testing.assert_close(got.train_images, data["train_images"].reshape(3, 784).float() / 255)
    assert torch.equal(got.test_labels, data["test_labels"]) and 0 <= float(got.test_images.min()) <= 1


def test_an_absent_folder_or_file_is_a_reason_naming_it(tmp_path):
    reason = mnist.missing(tmp_path / "absent")
    assert reason.startswith(f"MNIST not found at {tmp_path / 'absent'}") and "SOURCE.md" in reason
    _tiny_mnist(tmp_path / "partial")
    (tmp_path / "partial" / mnist.FILES["test_labels"]).unlink()
    reason = mnist.missing(tmp_path / "partial")
    assert "missing t10k-labels-idx1-ubyte.gz" in reason and "train-images" not in reason
    with pytest.raises(mnist.MNISTNotFound, match="missing t10k-labels-idx1-ubyte.gz"):
        mnist.load(tmp_path / "partial")
    assert issubclass(mnist.MNISTNotFound, FileNotFoundError)


def test_a_file_that_is_not_ubyte_idx_or_is_cut_short_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write((0x0D01).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes(8))  # float32 IDX
    with pytest.raises(ValueError, match="unsigned bytes"):
        mnist.read_idx(path)
    with gzip.open(path, "wb") as f:
        f.write((0x0801).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="5 bytes"):
        mnist.read_idx(path)


def test_both_mnist_benchmarks_skip_or_refuse_with_the_reason(tmp_path, capsys):
    from benchmarks import reinmax_vae_mnist, sign_optim_mnist

    assert sign_optim_mnist.main(["--data", str(tmp_path / "absent")]) == 0
    assert "MNIST not found at" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        reinmax_vae_mnist.main(["--data", str(tmp_path / "absent"), "--work", str(tmp_path / "w")])
    assert e.value.code == 2 and "--data: MNIST not found at" in capsys.readouterr().err


def test_the_real_files(shared_data):
    data = mnist.load(shared_data / "mnist")
    assert [len(t) for t in data] == [60000, 60000, 10000, 10000]
    # the train label counts of SOURCE.md
    assert data.train_labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
