"""Load a CSV or Parquet table, check its quality, and clean it.

String columns become integer codes (their index in a sorted vocabulary, which the
manifest carries so the device can encode them the same way); missing values are
imputed (median, or the most frequent category); outliers are capped at a few IQRs.
The same imputation values and caps go into the model graph (``zoo.TabularEncoder``),
so the device feeds raw rows and needs no scikit-learn.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from hub.training.dataset import (
    Dataset,
    Issue,
    QualityReport,
    TabularInfo,
    class_report,
    hash_files,
    resolve_path,
)
from hub.training.errors import DataError
from hub.training.spec import TaskSpec

__all__ = ["load_tabular", "read_table"]

# Caps for columns that are not capped: finite, so the ONNX graph holds no infinities.
_NO_CAP = (-3.0e38, 3.0e38)


def read_table(path: Path) -> tuple[list[str], dict[str, list[object] | np.ndarray]]:
    """Read CSV or Parquet into column name -> values (float64 array for numbers, list otherwise)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"data.path: {path} does not exist or is not a file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"data.path: cannot read {path.name}: {exc}") from exc
    columns: dict[str, list[object] | np.ndarray] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
            columns[name] = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        else:
            columns[name] = [None if v is None else str(v).strip() for v in column.to_pylist()]
    return list(table.column_names), columns


def load_tabular(spec: TaskSpec, base_dir: Path) -> Dataset:
    """Load and clean the task's table."""
    data = spec.data
    path = resolve_path(data.path, base_dir)
    names, columns = read_table(path)
    assert data.target is not None  # the spec requires it for tabular tasks
    if data.target not in columns:
        raise DataError(f"data.target: column {data.target!r} is not in {path.name} (columns: {', '.join(names)})")
    features = list(data.features) if data.features else [n for n in names if n != data.target]
    unknown = [f for f in features + list(data.categorical or []) if f not in columns or f == data.target]
    if unknown:
        raise DataError(f"data.features: no feature column {unknown[0]!r} in {path.name} (columns: {', '.join(names)})")
    if not features:
        raise DataError(f"data.features: {path.name} has no feature columns besides the target")
    rows_in = len(columns[data.target])
    issues: list[Issue] = []

    # The target: rows without one cannot train.
    target = columns[data.target]
    if spec.is_classification:
        raw_y = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else _label(v) for v in _values(target)]
        keep = np.array([v != "" for v in raw_y], dtype=bool)
    else:
        if not isinstance(target, np.ndarray):
            raise DataError(f"data.target: column {data.target!r} is not numeric; tabular-regression needs numbers")
        keep = ~np.isnan(target)
    if (dropped := int((~keep).sum())) > 0:
        issues.append(
            Issue(
                "missing_target",
                dropped,
                f"{dropped} rows have no {data.target}",
                f"dropped {dropped} rows",
                data.target,
            )
        )

    if not keep.any():
        raise DataError(f"data.path: {data.path!r} has no usable rows (none with a {data.target})")

    # Features as float64 with NaN for missing; string columns as vocabulary codes.
    categorical_names = set(data.categorical or [])
    matrix = np.empty((rows_in, len(features)), dtype=np.float64)
    vocab: dict[str, tuple[str, ...]] = {}
    for j, name in enumerate(features):
        values = columns[name]
        if isinstance(values, np.ndarray):
            matrix[:, j] = values
            continue
        categorical_names.add(name)
        words = tuple(sorted({str(v) for v in values if v is not None and v != ""}))
        index = {w: i for i, w in enumerate(words)}
        matrix[:, j] = [np.nan if v is None or v == "" else index[str(v)] for v in values]
        vocab[name] = words
    matrix = matrix[keep]
    if spec.is_classification:
        y_text = [raw_y[i] for i in np.flatnonzero(keep)]
    else:
        assert isinstance(target, np.ndarray)
        y_values = target[keep]

    # Duplicates: identical features and target.
    sentinel = np.where(np.isnan(matrix), -1.2345e300, matrix)
    seen: dict[bytes, int] = {}
    duplicate = np.zeros(len(matrix), dtype=bool)
    for i in range(len(matrix)):
        label = y_text[i] if spec.is_classification else repr(float(y_values[i]))
        key = sentinel[i].tobytes() + label.encode()
        if key in seen:
            duplicate[i] = True
        else:
            seen[key] = i
    if (count := int(duplicate.sum())) > 0:
        action = f"dropped {count} rows" if data.clean else "kept (clean: false)"
        issues.append(Issue("duplicates", count, f"{count} rows repeat an earlier row", action))
        if data.clean:
            matrix = matrix[~duplicate]
            if spec.is_classification:
                y_text = [v for v, d in zip(y_text, duplicate, strict=True) if not d]
            else:
                y_values = y_values[~duplicate]

    # Constant columns carry no information; they are dropped from the model's inputs.
    kept_columns = []
    for j, name in enumerate(features):
        distinct = np.unique(matrix[:, j][~np.isnan(matrix[:, j])])
        if distinct.size <= 1 and len(matrix) > 1:
            issues.append(Issue("constant_column", len(matrix), f"{name} has a single value", "column dropped", name))
        else:
            kept_columns.append(j)
    if not kept_columns:
        raise DataError("data.features: every feature column is constant; nothing to learn from")
    features = [features[j] for j in kept_columns]
    matrix = matrix[:, kept_columns]

    fill: dict[str, float] = {}
    bounds: dict[str, tuple[float, float]] = {}
    categorical: dict[str, tuple[float, ...]] = {}
    for j, name in enumerate(features):
        column = matrix[:, j]
        missing = np.isnan(column)
        is_categorical = name in categorical_names
        if is_categorical:
            values = column[~missing]
            categorical[name] = tuple(float(v) for v in np.unique(values))
            mode = Counter(values.tolist()).most_common(1)[0][0]
            fill[name] = float(mode)
        else:
            fill[name] = float(np.nanmedian(column))
        if missing.any():
            shown = vocab[name][int(fill[name])] if name in vocab else f"{fill[name]:g}"
            how = "most frequent" if is_categorical else "median"
            issues.append(
                Issue(
                    "missing_values",
                    int(missing.sum()),
                    f"{int(missing.sum())} empty cells",
                    f"imputed with {how} {shown}",
                    name,
                )
            )
            column[missing] = fill[name]
        if is_categorical:
            continue
        q1, q3 = np.percentile(column, [25, 75])
        iqr = q3 - q1
        if iqr <= 0 or not data.clean:
            bounds[name] = _NO_CAP
            continue
        low, high = float(q1 - data.outlier_iqr * iqr), float(q3 + data.outlier_iqr * iqr)
        outside = (column < low) | (column > high)
        if outside.any():
            issues.append(
                Issue(
                    "out_of_range",
                    int(outside.sum()),
                    f"{int(outside.sum())} values beyond {data.outlier_iqr:g} IQRs",
                    f"capped to [{low:.4g}, {high:.4g}]",
                    name,
                )
            )
            np.clip(column, low, high, out=column)
        bounds[name] = (low, high)

    info = TabularInfo(tuple(features), categorical, {k: v for k, v in vocab.items() if k in features}, fill, bounds)
    report_counts = None
    weighted = False
    if spec.is_classification:
        labels = tuple(sorted(set(y_text)))
        index = {label: i for i, label in enumerate(labels)}
        y = np.array([index[v] for v in y_text], dtype=np.int64)
        report_counts, imbalance = class_report(y, labels)
        if imbalance is not None:
            issues.append(imbalance)
            weighted = True
    else:
        labels = None
        y = y_values.astype(np.float32)
        if len(y) > 1 and float(np.std(y)) == 0.0:
            raise DataError(f"data.target: column {data.target!r} is constant; nothing to regress")
    report = QualityReport(rows_in, len(y), tuple(issues), report_counts)
    return Dataset(
        kind="tabular",
        y=y,
        report=report,
        data_hash=hash_files([path]),
        x=matrix.astype(np.float32),
        labels=labels,
        tabular=info,
        class_weighted=weighted,
    )


def _values(target: list[object] | np.ndarray) -> list[object]:
    return target.tolist() if isinstance(target, np.ndarray) else list(target)


def _label(value: object) -> str:
    """Return a class name; 1.0 from a numeric column reads as '1'."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
