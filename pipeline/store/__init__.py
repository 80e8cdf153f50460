"""The feature store: the one package that knows the on-disk format (see storage_layout.md).

Extraction writes through :class:`StoreWriter` / :class:`ShardWriter`; training, inspection and verification read
through :class:`StoreReader` and :func:`verify_store`. The parts: ``format`` (names, fingerprint, Arrow files,
fields), ``dtypes`` (storage casts, fp8, codecs), ``errors`` (clean write errors), ``integrity`` (commit records
and their checks), ``leftovers`` (locks, dead writers' files), ``writer``, ``reader``, ``convert``, ``inspect``,
``verify``. Every name callers use is re-exported here.
"""

from pipeline.store.convert import (  # noqa: F401
    _CopyDir,
    reencode_store,
)
from pipeline.store.dtypes import (  # noqa: F401
    CODE_MAX,
    CODECS,
    FP8,
    FP8_MAX,
    HIDDEN_DTYPES,
    INT7,
    INT7_MAX,
    LOGPROB_DTYPES,
    Q19,
    SCALE_SUFFIX,
    SCALED,
    ScaledRows,
    aux_dtype_for,
    check_hidden_dtype,
    dequantize,
    encode_field,
    from_storage,
    quantize_fp8,
    quantize_int7,
    storage_dtype,
    to_storage,
    topk_ids_dtype,
)
from pipeline.store.errors import (  # noqa: F401
    RERUN,
    StoreError,
    as_os_error,
    io_error_message,
)
from pipeline.store.format import (  # noqa: F401
    ALWAYS_FIELDS,
    COMMIT_FILE,
    COMMIT_SCHEMA,
    CORRUPT_PREFIX,
    COUNTS_FILE,
    EDITED_FINGERPRINT,
    FORMAT_VERSION,
    HIDDEN_FIELDS,
    INDEX_FILE,
    INDEX_SCHEMA,
    INFORMATIONAL,
    LOCKS_DIR,
    MAX_LISTED_SKIPS,
    READABLE_FORMATS,
    REQUIRED_FINGERPRINT,
    SHARDS_DIR,
    STORE_FILE,
    TARGET_DIR,
    TENSORS_DIR,
    TMP_PREFIX,
    TOKEN_ID_FIELDS,
    VERIFY_FILE,
    SampleMeta,
    TargetPieces,
    _flatten,
    _read_arrow,
    _write_arrow,
    array_shapes,
    canonical_json,
    chunk_key,
    config_sha256,
    diff_fingerprints,
    digest,
    field_shapes,
    fingerprint_digest,
    load_store_meta,
    missing_fingerprint_fields,
    projection_of,
    read_store_meta,
    sha256_file,
    sha256_files,
    shard_name,
)
from pipeline.store.inspect import (  # noqa: F401
    inspect_store,
)
from pipeline.store.integrity import (  # noqa: F401
    FOREIGN_SHARD,
    ShardInfo,
    check_target,
    open_shard,
    tensor_layout,
)
from pipeline.store.leftovers import (  # noqa: F401
    clean_leftovers,
    describe_leftover,
    disk_usage,
    find_leftovers,
    store_lock,
)
from pipeline.store.projection import (  # noqa: F401
    DEFAULT_CALIBRATION_TOKENS,
    PROJECTION_FILE,
    GramAccumulator,
    auto_projection_k,
    component_scale,
    describe_projection,
    encoder,
    fit_projection,
    load_projection,
    principal_projection,
    project,
    read_projection_file,
    save_projection,
)
from pipeline.store.reader import (  # noqa: F401
    StoreReader,
)
from pipeline.store.verify import (  # noqa: F401
    bad_shards_of,
    record_verify,
    verify_store,
)
from pipeline.store.writer import (  # noqa: F401
    ShardWriter,
    StoreWriter,
    chunk_length,
)
