"""Run-time weights of a Pipeline: LoRAs (set_loras) and textual-inversion embeddings
(set_embeddings), on each backend its own way:

  ort-cpu   a LoRA-ready graph (weights as inputs, runtime/backends/ort.py): a swap writes
            the bound arrays in place; embeddings grow the text encoder's token table
  ort-cuda  the same graph unoptimized, fp32, its weights on the GPU updated in place
            (a grown token table: a new device buffer, bound again)
  openvino  each touched graph cloned as loaded, its constants replaced, compiled again
  tensorrt  refittable plans refitted by ONNX initializer name (trt.Refitter); the text
            encoder's plan keeps TABLE_ROWS zero rows that embeddings are refitted into

Every set is applied to the bundle's own weights (runtime/lora_apply.py), so A -> B -> A
is A exactly and [] the bundle's; a failure midway leaves the bundle's weights, no LoRA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime import backends, cache, integrity
from runtime.args import first_line
from runtime.bundle import Manifest, integrity_files
from runtime.embeddings import TABLE_ROWS, TOKEN_TABLE, Embedding
from runtime.engine import Engine
from runtime.errors import UsageError
from runtime.tokenizer import ClipTokenizer

TEXT = "text_encoder"  # the graph (and LoRA component) embeddings change
OWN_SWAPS = ("tensorrt", "openvino")  # change weights their own way: no LoRA-ready graph


def read_embeddings(manifest: Manifest, tokenizer: ClipTokenizer,
                    files: Sequence[str | Path], backend: str = "") -> list[Embedding]:
    """Embedding files this bundle's text encoder and tokenizer can take (UsageError, one
    line): its token table mapped, one row per word of the vocabulary, every new word
    new, and on tensorrt at most the TABLE_ROWS rows its plans keep. Pipeline.
    set_embeddings, and the CLIs before they load anything."""
    from runtime.embeddings import EmbeddingError, check_unique, read_embedding

    table = (manifest.graphs[TEXT].weights or {}).get(TOKEN_TABLE)
    if table is None or table.transposed or len(table.shape) != 2:
        raise UsageError("this bundle has no map of its token-embedding table; re-export it "
                         "with `python -m export` for embeddings")
    rows = tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
    if rows != table.shape[0]:  # new ids start at the vocabulary's size: rows must too
        raise UsageError(f"this bundle's tokenizer has {rows} words but its text encoder "
                         f"{table.shape[0]} rows; embeddings cannot be added")
    try:
        read = [read_embedding(f, table.shape[1]) for f in files]
        check_unique(read, tokenizer.tokenizer.get_vocab())
    except EmbeddingError as e:
        raise UsageError(str(e)) from None
    vectors = sum(len(e.vectors) for e in read)
    if backend == "tensorrt" and vectors > TABLE_ROWS:
        raise UsageError(f"these embeddings have {vectors} vectors; a TensorRT text encoder "
                         f"plan keeps {TABLE_ROWS} rows for them")
    return read


class RunTimeWeights:
    """Pipeline's LoRA and embedding methods; the attributes are the Pipeline's."""

    bundle: Path
    manifest: Manifest
    backend: str
    use_cache: bool
    engine_set: backends.EngineSet
    log: Callable[[str], None]
    load_report: Any  # LoadReport
    tokenizer: ClipTokenizer
    _base_tokenizer: ClipTokenizer
    loras: list[tuple[Path, float]]
    embeddings: list[Embedding]
    _lora_graphs: set[str]
    _lora_touched: dict[str, set[str]]
    _table: np.ndarray | None
    _vocabulary: int
    _checked: Callable[[integrity.BundleCheck], None]  # the bundle check's verdict, or raise
    _loaded: Callable[[str, Engine, float], None]  # what a (re)loaded engine reports

    def set_loras(self, loras: Sequence[tuple[str | Path, float]]) -> None:
        """Run with these LoRAs, (file, scale) each, applied in order to the bundle's own
        weights: each call replaces the last set, so A -> B -> A is A exactly and [] is the
        bundle again. ort-cpu and ort-cuda with the engine cache (a LoRA-ready graph),
        tensorrt with refittable plans (`engines.build --refit`), openvino (graphs
        recompiled). UsageError for a file this model cannot use; if loading fails
        midway, every graph is back on the bundle's weights (no LoRA)."""
        from runtime.lora import MAX_SCALE as MAX_LORA_SCALE
        from runtime.lora import LoraError
        from runtime.lora_apply import LORA_GRAPHS, all_params, read_loras, touched

        self._check_weight_inputs("run-time LoRAs", bool(loras), "; or bake them in with "
                                  "`python -m export --lora FILE:SCALE`")
        for _, scale in loras:
            if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)) \
                    or not -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE:
                raise UsageError(f"a LoRA scale must be a number in [{-MAX_LORA_SCALE:g}, "
                                 f"{MAX_LORA_SCALE:g}], got {scale!r}")
        try:
            read = read_loras(self.manifest, loras)
        except LoraError as e:
            raise UsageError(str(e)) from None
        t = time.perf_counter()
        # base weights are read from the bundle's files: checked again, as at load (a
        # stat each when unchanged; an export over the bundle since is caught here)
        self._checked(integrity.BundleCheck(
            integrity_files(self.bundle, self.manifest, list(LORA_GRAPHS.values())),
            cache.verified_memo(self.bundle) if self.use_cache else None))
        now, every = touched(read), all_params(self.manifest)
        if self.backend == "tensorrt":
            self._refit_loras(read, now)
        elif self.backend == "openvino":
            self._recompile_loras(read, now)
        else:
            self._swap_lora_ready(read, now, every)
        self._lora_touched = now
        self.loras = [(Path(p), float(s)) for p, s in loras]
        seconds = time.perf_counter() - t
        self.load_report.seconds += seconds
        self.log(f"LoRAs: {', '.join(f'{p.name}:{s:g}' for p, s in self.loras) or 'none'} "
                 f"({seconds:.2f} s)")

    def _swap_lora_ready(self, read: list, now: dict[str, set[str]],
                         every: dict[str, set[str]]) -> None:
        """ort-cpu, ort-cuda: each graph a LoRA touches on its LoRA-ready engine (weights as inputs),
        the others on the bundle's; on failure all on the bundle's, no LoRA."""
        from runtime.lora_apply import LORA_GRAPHS, lora_weights

        try:
            for component, graph in LORA_GRAPHS.items():
                loaded = graph in self._lora_graphs  # a LoRA-ready engine: weights are inputs
                # embeddings keep the text encoder LoRA-ready: its token table is grown
                if not now[component] and not (component == TEXT and self._table is not None):
                    if loaded:  # no LoRA here any more: the bundle's own engine, bit for bit
                        self._lora_graphs.discard(graph)
                        self.engine_set.replace_weights(graph, self.manifest, self.bundle,
                                                        None, self._loaded)
                    continue
                # a swap rewrites what the old or new LoRAs touch, from the base weights
                # (A -> B -> A is A exactly); a first LoRA loads every mapped weight
                also = self._lora_touched.get(component, set()) if loaded else every[component]
                if not loaded:  # its weights go before every mapped weight is read: one copy
                    self.engine_set.drop(graph)
                into = getattr(self.engine_set.engines[graph], "weights", None) if loaded else None
                new = lora_weights(self.bundle, self.manifest, read, {component: also},
                                   into).get(graph, {})
                self.engine_set.replace_weights(graph, self.manifest, self.bundle, new,
                                                self._loaded, in_place=loaded)
                self._lora_graphs.add(graph)
                del new  # in place: our copies go now; a new engine keeps these arrays
        except BaseException:
            self.loras, self._lora_touched = [], {}
            for graph in LORA_GRAPHS.values():  # back to the bundle's weights everywhere
                if graph in self._lora_graphs or graph not in self.engine_set.engines:
                    self.engine_set.replace_weights(graph, self.manifest, self.bundle, None,
                                                    self._loaded)
            self._lora_graphs.clear()
            if self._table is not None:  # the embeddings stay, on the bundle's weights
                try:
                    self._set_table(self._table)
                except Exception as e:  # noqa: BLE001 (the LoRA error is the one raised)
                    self.log(f"embeddings dropped: {first_line(e)}")
                    self._forget_embeddings()
            raise
        finally:
            backends.give_back_freed_memory()

    def _refit_loras(self, read: list, now: dict[str, set[str]]) -> None:
        """TensorRT: refit each plan with what the old or new LoRAs touch, base weights
        plus the new deltas (A -> B -> A is A exactly); on failure, every plan read from
        its file again (its own weights), no LoRA."""
        from runtime.lora_apply import LORA_GRAPHS, lora_weights

        names = {c: self._lora_touched.get(c, set()) | now[c] for c in LORA_GRAPHS}
        try:
            new = lora_weights(self.bundle, self.manifest, read, names)  # graph -> init -> array
            for component, graph in LORA_GRAPHS.items():
                if not names[component]:
                    continue
                entry = self.manifest.graphs[graph]
                params = {w.initializer: p for p, w in (entry.weights or {}).items()}

                def more(init: str, component: str = component, graph: str = graph,
                         params: dict[str, str] = params) -> np.ndarray | None:
                    # a mapped weight TensorRT fused with ours, no LoRA's: the bundle's
                    param = params.get(init)
                    return None if param is None else lora_weights(
                        self.bundle, self.manifest, [], {component: {param}})[graph][init]

                changed = {entry.weights[p].initializer for p in now[component]}  # type: ignore[index]
                self.engine_set.engines[graph].refit_weights(  # type: ignore[attr-defined]
                    new.get(graph, {}), more, self.bundle / entry.file, changed)
        except BaseException:
            self.loras, self._lora_touched = [], {}
            for graph in LORA_GRAPHS.values():
                try:
                    self.engine_set.engines[graph].reset_weights()  # type: ignore[attr-defined]
                    if graph == TEXT and self._table is not None:  # the embeddings stay
                        self._refit_table(self._table)
                except Exception as e:  # noqa: BLE001 (the first error is the one raised)
                    self.log(f"could not reload the {graph} plan: {first_line(e)}")
                    if graph == TEXT and self._table is not None:
                        self._forget_embeddings()
            raise

    def _recompile_loras(self, read: list, now: dict[str, set[str]]) -> None:
        """OpenVINO: each graph the old or new LoRAs touch read again from its file, the
        new LoRAs' weights put in and compiled (A -> B -> A is A exactly, [] the graph's
        own); on failure every such graph back on its own weights, no LoRA."""
        from runtime.lora_apply import LORA_GRAPHS, lora_weights

        graphs = [g for c, g in LORA_GRAPHS.items() if self._lora_touched.get(c) or now[c]]
        try:
            new = lora_weights(self.bundle, self.manifest, read, now)  # graph -> init -> array
            for graph in graphs:  # each graph's arrays go as its constants are made
                self.engine_set.engines[graph].set_weights(  # type: ignore[attr-defined]
                    {**new.pop(graph, {}), **self._grown(graph)})
        except BaseException:
            self.loras, self._lora_touched = [], {}
            for graph in graphs:
                try:  # its own weights; the text encoder keeps the embeddings' table
                    self.engine_set.engines[graph].set_weights(self._grown(graph))  # type: ignore[attr-defined]
                except Exception as e:  # noqa: BLE001 (the first error is the one raised)
                    self.log(f"could not put the {graph} graph back on its weights: {first_line(e)}")
                    if graph == TEXT and self._table is not None:
                        self._forget_embeddings()
            raise

    def _grown(self, graph: str) -> dict[str, np.ndarray]:
        """OpenVINO: what graph `graph` takes besides LoRAs: the embeddings' token table."""
        return {self._table_name(): self._table} if graph == TEXT and self._table is not None else {}

    def set_embeddings(self, files: Sequence[str | Path]) -> None:
        """Textual inversion: prompts may use these embeddings' words (runtime/
        embeddings.py, diffusers' load_textual_inversion); each call replaces the last
        set, [] removes them. On every backend, as set_loras (TensorRT: refittable text
        encoder plans with rows kept for them); LoRAs stay.
        UsageError (one line) for a file this model cannot use, before anything changes;
        if loading fails after that, the Pipeline is left with no embeddings. Requests
        made before this call are refused by run() (their token ids are stale)."""
        self._check_weight_inputs("textual-inversion embeddings", bool(files))
        read = read_embeddings(self.manifest, self._base_tokenizer, files, self.backend)
        rows = self._table_entry().shape[0]
        words = [w for e in read for w in e.tokens]
        tokenizer = self._base_tokenizer.with_words(words) if words else self._base_tokenizer
        t = time.perf_counter()
        grown = None
        try:
            if read:  # [V + k, C]: the bundle's rows (checked first), each embedding's after
                self._checked(integrity.BundleCheck(
                    integrity_files(self.bundle, self.manifest, [TEXT]),
                    cache.verified_memo(self.bundle) if self.use_cache else None))
                grown = self._base_table(len(words))
                grown[rows:] = np.concatenate([e.vectors for e in read])
            self._set_table(grown)
        except BaseException:
            self._forget_embeddings()
            raise
        finally:
            backends.give_back_freed_memory()
        self.tokenizer, self.embeddings, self._table = tokenizer, read, grown
        self._vocabulary += 1
        seconds = time.perf_counter() - t
        self.load_report.seconds += seconds
        self.log(f"embeddings: {', '.join(f'{e.token} ({len(e.vectors)} vectors)' for e in read) or 'none'} "
                 f"({seconds:.2f} s)")

    def _set_table(self, grown: np.ndarray | None) -> None:
        """The text encoder with this token table [V + k, C] (None: the bundle's), its
        other weights as they are (the bundle's, or with the LoRAs). Afterwards a table
        means a LoRA-ready text encoder holding it."""
        from runtime.lora_apply import all_params, lora_weights

        if self.backend == "tensorrt":
            self._refit_table(grown)
            return
        if self.backend == "openvino":  # a compile: the LoRAs' weights as they are
            engine = self.engine_set.engines[TEXT]
            if grown is None and not self._lora_touched.get(TEXT):
                engine.set_weights({})  # type: ignore[attr-defined]
                return
            grown = self._base_table() if grown is None else grown
            engine.set_weights({self._table_name(): grown}, keep=True)  # type: ignore[attr-defined]
            return
        loaded = TEXT in self._lora_graphs and TEXT in self.engine_set.engines
        if grown is None and (not loaded or not self._lora_touched.get(TEXT)):
            if loaded or TEXT not in self.engine_set.engines:  # nothing else changed: the bundle's own
                self._lora_graphs.discard(TEXT)
                self.engine_set.replace_weights(TEXT, self.manifest, self.bundle, None, self._loaded)
            return
        name = self._table_name()
        if grown is None:  # the LoRAs stay: the bundle's own table back in its place
            grown = self._base_table()
        if loaded:
            self.engine_set.replace_weights(TEXT, self.manifest, self.bundle, {name: grown},
                                            self._loaded, in_place=True)
            return
        # not LoRA-ready, so no LoRA touches it: the bundle's weights, this table
        self._lora_graphs.discard(TEXT)
        self.engine_set.drop(TEXT)
        others = all_params(self.manifest)[TEXT] - {TOKEN_TABLE}
        new = lora_weights(self.bundle, self.manifest, [], {TEXT: others}).get(TEXT, {})
        new[name] = grown
        self.engine_set.replace_weights(TEXT, self.manifest, self.bundle, new, self._loaded)
        self._lora_graphs.add(TEXT)

    def _refit_table(self, grown: np.ndarray | None) -> None:
        """TensorRT: the text encoder's token table refitted into a plan that keeps
        TABLE_ROWS zero rows after the bundle's (engines.build --refit): [V + k, C] then
        zeros. None: the bundle's table (the plan's own weights when no LoRA is on it)."""
        engine: Any = self.engine_set.engines[TEXT]
        if grown is None and not engine.keeps_rows():
            return  # no plan with rows: no embedding ever went in
        if grown is None and not self._lora_touched.get(TEXT):
            engine.reset_weights()  # its own weights: the bundle's table, zero rows after
            return
        if grown is None:
            padded = self._base_table(TABLE_ROWS)
            padded[self._table_entry().shape[0]:] = 0
        else:
            padded = np.zeros((TABLE_ROWS + self._table_entry().shape[0], grown.shape[1]), np.float32)
            padded[:len(grown)] = grown
        name = self._table_name()
        engine.refit_weights({name: padded}, None, self.bundle / self.manifest.graphs[TEXT].file,
                             {name}, rows=TABLE_ROWS)

    def _forget_embeddings(self) -> None:
        """No embeddings (after a failed load): the tokenizer without their words, the
        text encoder's table the bundle's (else, failing that, its own engine)."""
        self.embeddings, self._table, self.tokenizer = [], None, self._base_tokenizer
        self._vocabulary += 1
        try:
            self._set_table(None)
        except Exception as e:  # noqa: BLE001 (the caller's error is the one to report)
            self.log(f"text encoder back to the bundle's own engine, LoRAs dropped: {first_line(e)}")
            self._without_loras()

    def _without_loras(self) -> None:
        """Last resort, after a text encoder could not be put back: every LoRA graph on
        the bundle's own weights (its engine loaded again), no LoRA, no embeddings."""
        from runtime.lora_apply import LORA_GRAPHS

        self.loras, self._lora_touched = [], {}
        self._lora_graphs.clear()
        for graph in LORA_GRAPHS.values():  # the plan, model or graph read from its file
            self.engine_set.drop(graph)
            self.engine_set.add(graph, self.manifest, self.bundle, self._loaded)

    def _table_entry(self) -> Any:  # the token table's WeightRef in the weight map
        return (self.manifest.graphs[TEXT].weights or {})[TOKEN_TABLE]

    def _table_name(self) -> str:  # the token table's initializer in the text encoder graph
        return self._table_entry().initializer

    def _base_table(self, more_rows: int = 0) -> np.ndarray:
        """The bundle's token table [V, C], read from its file into a float32 array with
        `more_rows` rows after it (left uninitialised: the caller fills them)."""
        from runtime.lora_apply import read_base

        entry = self._table_entry()
        out = np.empty((entry.shape[0] + more_rows, entry.shape[1]), np.float32)
        read_base(self.bundle, entry.file, entry.offset, TOKEN_TABLE, out[:entry.shape[0]])
        return out

    def _check_weight_inputs(self, what: str, any_files: bool, hint: str = "") -> None:
        """Run-time weights (LoRAs, embeddings) need an open Pipeline: on tensorrt (plans
        refitted) or openvino (graphs recompiled) as it is, on ort-cpu and ort-cuda with
        the engine cache and the onnx package (to make the LoRA-ready graph)."""
        from runtime.lora_apply import missing_support

        if not self.engine_set.engines:
            raise UsageError("this Pipeline is closed")
        if self.backend in OWN_SWAPS:
            return
        if any_files and missing_support():
            raise UsageError(str(missing_support()))
        if not self.use_cache:
            raise UsageError(f"{what} on {self.backend} need the engine cache, which this "
                             f"Pipeline has off{hint}")
