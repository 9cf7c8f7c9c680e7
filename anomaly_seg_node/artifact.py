"""The artifact sidecar (NAME.json): the only code that knows its schema.

An artifact is NAME.onnx, optionally NAME.pt2, and NAME.json, written by `anomaly-seg export`
(`--formats onnx` leaves out the .pt2, which only the torch and tensorrt backends need). The
sidecar names the model files (relative to its own folder) with their sha256, the input
contract, the score, the classes and the named thresholds. `read_sidecar` refuses a missing,
malformed or unknown-version sidecar, or one whose listed files are missing or differ, before
anything is loaded.

An int8 artifact (`anomaly-seg export --int8`, written beside the fp32 one as NAME-int8) is
the same contract with a statically quantised ONNX graph: `precision` is 'int8', `quantization`
says how it was made and calibrated, it ships no .pt2 (onnxruntime on the CPU runs it) and its
thresholds were calibrated on its own scores.

Artifacts are code: a .pt2 or .onnx file can make the runtime do anything its operators allow.
Load them only from sources you trust; the sha256 proves integrity, not authorship.

Standard library only, so the runtime reads sidecars without torch.
"""

from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
import hashlib
import json
import math
import os
from pathlib import Path
import tempfile
from typing import Any

from anomaly_seg_node.errors import ArtifactError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MODEL_FILE_KINDS = ('onnx', 'pt2')
# ONNX Runtime, the vehicle's CPU path, needs only the .onnx; the .pt2 may be left out.
REQUIRED_FILE_KINDS = ('onnx',)
OUTPUT_NAMES = ('labels', 'anomaly_score')
# Where the graph computes the score (ScoreSpec.resolution).
SCORE_RESOLUTIONS = ('input', 'stride4')
# Labels leave the graph as int32 (every release) or uint8 (a quarter of the bytes to copy off
# a GPU; needs fewer than 256 classes); the score is float32 (LabelOutput, Sidecar.outputs).
LABEL_DTYPES = ('int32', 'uint8')
SCORE_DTYPE = 'float32'
# How letterbox bars are filled (InputSpec.pad_mode; anomaly_seg_node.imaging says why).
PAD_MODES = ('reflect', 'constant')
# What a sidecar without input.pad_mode means: the flat fill every earlier export used.
DEFAULT_PAD_MODE = 'constant'
# What the .onnx graph computes in: float32 throughout, or int8 QDQ (Sidecar.precision).
MODEL_PRECISIONS = ('fp32', 'int8')
_FIX = 're-export with anomaly-seg export or fetch the matching files'


def missing_format_fix(kind: str) -> str:
    """What to do when an artifact ships no `kind` file: `this artifact ships no .pt2; ...`."""
    return (f'this artifact ships no .{kind}; re-export with anomaly-seg export --formats '
            f'{",".join(MODEL_FILE_KINDS)}')


@dataclass(frozen=True)
class ScoreSpec:
    """What `anomaly_score` means: score name, units and temperature (None = not used).

    `resolution`: 'input' computes the score on the logits upsampled to the input size (the
    paper); 'stride4' on the decoder's stride-4 logits, the score map then upsampled
    bilinearly (SCORE_RESOLUTIONS; a sidecar without the field is 'input').
    """

    name: str
    units: str
    temperature: float | None = None
    higher_is_more_anomalous: bool = True
    resolution: str = 'input'


@dataclass(frozen=True)
class LabelOutput:
    """How the graph's `labels` output is made: its dtype (LABEL_DTYPES) and resolution.

    `resolution` 'input': argmax of the class logits upsampled bilinearly to the input size
    (the paper); 'stride4': argmax of the decoder's stride-4 logits, the label map then upsampled
    by nearest neighbour (each stride-4 cell covers 4x4 input pixels): K channels are no
    longer upsampled, at a cost in mIoU on thin objects. A sidecar without the fields is
    int32 at 'input'.
    """

    dtype: str = 'int32'
    resolution: str = 'input'


@dataclass(frozen=True)
class InputSpec:
    """The one static input of the graph: float32 NCHW RGB in 0..255."""

    height: int
    width: int
    batch: int = 1
    name: str = 'image'
    dtype: str = 'float32'
    layout: str = 'NCHW'
    channels: str = 'RGB'
    range: tuple[float, float] = (0.0, 255.0)
    # The colour of letterbox bars (anomaly_seg_node.imaging): what the model saw as padding
    # in training. None: not recorded (older sidecars); see Sidecar.pad_rgb.
    pad_rgb: tuple[int, int, int] | None = None
    # How the bars are filled: 'reflect' (the picture mirrored) or 'constant' (pad_rgb); older
    # sidecars, which do not say, were calibrated with 'constant'.
    pad_mode: str = DEFAULT_PAD_MODE


@dataclass(frozen=True)
class FileRef:
    """A model file next to the sidecar and its sha256 (hex)."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Sidecar:
    """Schema v1 of NAME.json. `source` is the file it was read from (not serialised)."""

    method: str
    score: ScoreSpec
    input: InputSpec
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    files: dict[str, FileRef]
    void_id: int = 255
    thresholds: dict[str, float] = field(default_factory=dict)
    default_threshold: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    code_version: str = 'unknown'
    created: str = ''
    # 'int8': NAME.onnx is a statically quantised QDQ graph; `quantization` says how it was
    # made (format, calibration frames, the fp32 graph it was checked against).
    precision: str = 'fp32'
    quantization: dict[str, Any] = field(default_factory=dict)
    labels: LabelOutput = field(default_factory=LabelOutput)
    schema_version: int = SCHEMA_VERSION
    source: str | None = field(default=None, compare=False)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the graph's input."""
        return (self.input.height, self.input.width)

    @property
    def pad_rgb(self) -> tuple[int, int, int]:
        """Letterbox fill: `input.pad_rgb`, else the training config's data.mean_fill (the
        padding colour of its crops), else black."""
        if self.input.pad_rgb is not None:
            return self.input.pad_rgb
        fill = self.training.get('config', {}).get('data', {}).get('mean_fill')
        if isinstance(fill, list) and _is_rgb(fill):
            return (fill[0], fill[1], fill[2])
        return (0, 0, 0)

    @property
    def pad_mode(self) -> str:
        """Letterbox fill mode (anomaly_seg_node.imaging.PAD_MODES): `input.pad_mode`."""
        return self.input.pad_mode

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        """Output names, dtypes and shapes (and how the labels are made)."""
        shape = [self.input.batch, self.input.height, self.input.width]
        return {'labels': {'dtype': self.labels.dtype, 'shape': list(shape),
                           'resolution': self.labels.resolution},
                'anomaly_score': {'dtype': SCORE_DTYPE, 'shape': list(shape)}}

    @property
    def folder(self) -> Path:
        """The folder the file names are relative to (needs `source`)."""
        if self.source is None:
            raise ArtifactError(
                'this sidecar was not read from a file, so its model files cannot be located; '
                'read it with read_sidecar(path) or pass the path of NAME.json')
        return Path(self.source).parent

    @property
    def formats(self) -> tuple[str, ...]:
        """The model file kinds this artifact ships, in MODEL_FILE_KINDS order."""
        return tuple(kind for kind in MODEL_FILE_KINDS if kind in self.files)

    def has(self, kind: str) -> bool:
        """Whether the artifact ships a model file of `kind` ('onnx' or 'pt2')."""
        return kind in self.files

    def file_path(self, kind: str) -> Path:
        """Absolute path of the model file of `kind` ('onnx' or 'pt2')."""
        if kind not in self.files:
            raise ArtifactError(
                f'artifact {self.source or "(not read from a file)"} lists no {kind!r} file '
                f'(it has {list(self.formats)}): {missing_format_fix(kind)}')
        return self.folder / self.files[kind].name

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the sidecar (what `write_sidecar` writes)."""
        return {
            'schema_version': self.schema_version,
            'method': self.method,
            'score': dataclasses.asdict(self.score),
            'input': _input_dict(self.input),
            'outputs': self.outputs,
            'classes': list(self.classes),
            'palette': [list(rgb) for rgb in self.palette],
            'void_id': self.void_id,
            'thresholds': dict(self.thresholds),
            'default_threshold': self.default_threshold,
            'parity': self.parity,
            'files': {kind: dataclasses.asdict(ref) for kind, ref in self.files.items()},
            'training': self.training,
            'code_version': self.code_version,
            'created': self.created,
            'precision': self.precision,
            **({'quantization': self.quantization} if self.quantization else {}),
        }


def _input_dict(spec: InputSpec) -> dict[str, Any]:
    document = {**dataclasses.asdict(spec), 'range': list(spec.range)}
    if spec.pad_rgb is None:
        del document['pad_rgb']
    else:
        document['pad_rgb'] = list(spec.pad_rgb)
    return document


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_sidecar(path: str | os.PathLike, verify_hashes: bool = True) -> Sidecar:
    """Read and validate NAME.json; with `verify_hashes`, also check every listed model file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f'artifact sidecar {path} does not exist (expected NAME.json written by '
            'anomaly-seg export); check the path or export the artifact')
    try:
        document = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(
            f'artifact sidecar {path} is not valid JSON ({error}); {_FIX}') from None
    sidecar = sidecar_from_dict(document, where=str(path))
    sidecar = dataclasses.replace(sidecar, source=str(path.resolve()))
    for kind, ref in sidecar.files.items():
        file_path = sidecar.folder / ref.name
        if not file_path.is_file():
            raise ArtifactError(
                f'artifact {path}: its {kind} file {file_path} is missing; {_FIX}')
        if verify_hashes:
            found = sha256_file(file_path)
            if found != ref.sha256:
                raise ArtifactError(
                    f'artifact {path}: {file_path.name} has sha256 {found}, the sidecar expects '
                    f'{ref.sha256} (the files do not belong together); {_FIX}')
    return sidecar


def write_sidecar(sidecar: Sidecar, path: str | os.PathLike) -> Path:
    """Write NAME.json atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    text = json.dumps(sidecar.to_dict(), indent=2, allow_nan=False) + '\n'
    atomic_write_bytes(path, text.encode('utf-8'))
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; sidecars are shared read-only files
        with os.fdopen(fd, 'wb') as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_threshold(sidecar: Sidecar, value: float | int | str | None = None) -> float:
    """A threshold as a number: `value` itself, a named sidecar threshold, or the default one.

    Strings that parse as numbers are numbers (ROS parameters often arrive as strings).
    """
    if value is None:
        if sidecar.default_threshold is None:
            raise ArtifactError(
                'the artifact has no default threshold (its thresholds block is empty); '
                'give the threshold as a number or re-export with calibration data')
        value = sidecar.default_threshold
    if isinstance(value, bool):
        raise ArtifactError(f'a threshold must be a number or a name, found {value!r}')
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        try:
            number = float(value)
        except ValueError:
            if value not in sidecar.thresholds:
                known = ', '.join(sorted(sidecar.thresholds)) or 'none'
                raise ArtifactError(
                    f'unknown threshold name {value!r}; this artifact knows: {known} '
                    '(or give a number)') from None
            number = float(sidecar.thresholds[value])
    if not math.isfinite(number):
        raise ArtifactError(f'a threshold must be finite, found {value!r}')
    return number


def sidecar_from_dict(document: Any, where: str = 'sidecar') -> Sidecar:
    """Validate a parsed sidecar document field by field and build the `Sidecar`."""
    check = _Checker(where)
    if not isinstance(document, Mapping):
        check.fail('', 'a JSON object', document)
    version = check.get(document, 'schema_version', int)
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ArtifactError(
            f'{where}: unknown sidecar schema_version {version}; this runtime reads '
            f'{list(SUPPORTED_SCHEMA_VERSIONS)}. Upgrade anomaly_seg or re-export the artifact '
            'with this version of anomaly-seg export')
    method = check.get(document, 'method', str)

    score_doc = check.get(document, 'score', Mapping)
    temperature = check.get(score_doc, 'temperature', (int, float, type(None)), 'score.')
    higher = check.get(score_doc, 'higher_is_more_anomalous', bool, 'score.')
    if higher is not True:
        check.fail('score.higher_is_more_anomalous', 'true (the runtime thresholds score > t)',
                   higher)
    score = ScoreSpec(
        name=check.get(score_doc, 'name', str, 'score.'),
        units=check.get(score_doc, 'units', str, 'score.'),
        temperature=None if temperature is None else float(temperature),
        higher_is_more_anomalous=True,
        resolution=check.choice(score_doc, 'resolution', SCORE_RESOLUTIONS, 'score.',
                                default='input'))

    input_doc = check.get(document, 'input', Mapping)
    fixed = {'name': 'image', 'dtype': 'float32', 'layout': 'NCHW', 'channels': 'RGB'}
    for key, expected in fixed.items():
        found = check.get(input_doc, key, str, 'input.')
        if found != expected:
            check.fail(f'input.{key}', repr(expected), found)
    value_range = check.get(input_doc, 'range', list, 'input.')
    if value_range != [0, 255]:
        check.fail('input.range', '[0, 255]', value_range)
    pad_rgb = input_doc.get('pad_rgb')
    if pad_rgb is not None and not _is_rgb(pad_rgb):
        check.fail('input.pad_rgb', '[r, g, b] of 0..255 (the letterbox colour) or absent',
                   pad_rgb)
    input_spec = InputSpec(
        height=check.positive_int(input_doc, 'height', 'input.'),
        width=check.positive_int(input_doc, 'width', 'input.'),
        batch=check.positive_int(input_doc, 'batch', 'input.'),
        pad_rgb=None if pad_rgb is None else (pad_rgb[0], pad_rgb[1], pad_rgb[2]),
        pad_mode=check.choice(input_doc, 'pad_mode', PAD_MODES, 'input.',
                              default=DEFAULT_PAD_MODE))

    outputs = check.get(document, 'outputs', Mapping)
    labels_out = LabelOutput()
    for name in OUTPUT_NAMES:
        spec = check.get(outputs, name, Mapping, 'outputs.')
        if name == 'labels':
            labels_out = LabelOutput(
                dtype=check.choice(spec, 'dtype', LABEL_DTYPES, 'outputs.labels.'),
                resolution=check.choice(spec, 'resolution', SCORE_RESOLUTIONS,
                                        'outputs.labels.', default='input'))
        elif check.get(spec, 'dtype', str, f'outputs.{name}.') != SCORE_DTYPE:
            check.fail(f'outputs.{name}.dtype', repr(SCORE_DTYPE), spec['dtype'])
        shape = check.get(spec, 'shape', list, f'outputs.{name}.')
        expected_shape = [input_spec.batch, input_spec.height, input_spec.width]
        if shape != expected_shape:
            check.fail(f'outputs.{name}.shape', f'{expected_shape} (batch, H, W of the input)',
                       shape)

    classes = check.get(document, 'classes', list)
    if not classes or not all(isinstance(name, str) for name in classes):
        check.fail('classes', 'a non-empty list of class names', classes)
    palette = check.get(document, 'palette', list)
    if len(palette) != len(classes) or not all(_is_rgb(rgb) for rgb in palette):
        check.fail('palette', f'{len(classes)} [r, g, b] triples of 0..255 (one per class)',
                   palette)
    void_id = check.get(document, 'void_id', int)
    if not 0 <= void_id <= 255 or void_id < len(classes):
        check.fail('void_id', f'an id in {len(classes)}..255 (not a class id)', void_id)

    thresholds = check.get(document, 'thresholds', Mapping)
    for name, number in thresholds.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not math.isfinite(number):
            check.fail(f'thresholds.{name}', 'a finite number', number)
    default_threshold = check.get(document, 'default_threshold', (str, type(None)))
    if default_threshold is not None and default_threshold not in thresholds:
        check.fail('default_threshold', f'one of the thresholds {sorted(thresholds)} or null',
                   default_threshold)

    files_doc = check.get(document, 'files', Mapping)
    files = {}
    for kind in MODEL_FILE_KINDS:
        if kind not in REQUIRED_FILE_KINDS and kind not in files_doc:
            continue  # an optional format left out at export (anomaly-seg export --formats)
        ref = check.get(files_doc, kind, Mapping, 'files.')
        name = check.get(ref, 'name', str, f'files.{kind}.')
        if not name or Path(name).name != name:
            check.fail(f'files.{kind}.name', 'a plain file name next to the sidecar', name)
        digest = check.get(ref, 'sha256', str, f'files.{kind}.')
        if len(digest) != 64 or any(c not in '0123456789abcdef' for c in digest):
            check.fail(f'files.{kind}.sha256', '64 lower-case hex digits', digest)
        files[kind] = FileRef(name=name, sha256=digest)

    # Absent in sidecars written before int8 artifacts existed: those are float32 graphs.
    precision = check.choice(document, 'precision', MODEL_PRECISIONS, default='fp32')
    quantization = check.get(document, 'quantization', Mapping) \
        if 'quantization' in document else {}
    if precision == 'int8':
        if not quantization:
            check.fail('quantization', 'a non-empty object (how the int8 graph was made) for '
                       'precision int8', quantization)
        if 'pt2' in files:
            check.fail('files.pt2', 'absent for precision int8 (the int8 graph is the .onnx; a '
                       '.pt2 would run float weights against int8 thresholds)', files_doc['pt2'])
    elif quantization:
        check.fail('quantization', f'absent for precision {precision}', quantization)

    return Sidecar(
        schema_version=version,
        method=method,
        score=score,
        input=input_spec,
        classes=tuple(classes),
        palette=tuple(tuple(rgb) for rgb in palette),
        void_id=void_id,
        thresholds={name: float(number) for name, number in thresholds.items()},
        default_threshold=default_threshold,
        parity=dict(check.get(document, 'parity', Mapping)),
        files=files,
        training=dict(check.get(document, 'training', Mapping)),
        code_version=check.get(document, 'code_version', str),
        created=check.get(document, 'created', str),
        precision=precision,
        quantization=dict(quantization),
        labels=labels_out,
    )


def _is_rgb(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
                    for c in value))


class _Checker:
    """Field access that turns a missing or ill-typed field into an ArtifactError."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, expected: str, found: Any) -> None:
        shown = repr(found)
        if len(shown) > 80:
            shown = shown[:77] + '...'
        raise ArtifactError(
            f'{self.where}: field {key or "<top level>"!r} must be {expected}, found {shown} '
            f'({type(found).__name__}); {_FIX}')

    def get(self, document: Mapping, key: str, kind: Any, prefix: str = '') -> Any:
        if key not in document:
            raise ArtifactError(
                f'{self.where}: required field {prefix + key!r} is missing; {_FIX}')
        value = document[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass; a JSON true is never a valid number here.
        if isinstance(value, bool) and bool not in kinds:
            self.fail(prefix + key, _type_words(kinds), value)
        if not isinstance(value, kinds):
            self.fail(prefix + key, _type_words(kinds), value)
        return value

    def choice(self, document: Mapping, key: str, choices: tuple[str, ...], prefix: str = '',
               default: str | None = None) -> str:
        if key not in document and default is not None:
            return default
        value = self.get(document, key, str, prefix)
        if value not in choices:
            self.fail(prefix + key, f'one of {list(choices)}', value)
        return value

    def positive_int(self, document: Mapping, key: str, prefix: str = '') -> int:
        value = self.get(document, key, int, prefix)
        if value <= 0:
            self.fail(prefix + key, 'a positive integer', value)
        return value


def _type_words(kinds: tuple) -> str:
    words = {str: 'a string', int: 'an integer', float: 'a number', bool: 'true or false',
             list: 'a list', Mapping: 'an object', type(None): 'null'}
    if int in kinds and float in kinds:
        kinds = tuple(kind for kind in kinds if kind is not int)
    return ' or '.join(words.get(kind, kind.__name__) for kind in kinds)
