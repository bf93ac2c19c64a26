"""In-process transformers backend: batched generation that re-reads as little of each prompt as it can.

On a CPU an agent step costs its prompt: 1-3k tokens of instruction, in-context example and history
go through the model before the first new token, while one episode's consecutive prompts, the N
rollouts of one step record and all prompts of a task family share most of those tokens. So:

- `PrefixCache` keeps the key/value states of recent sequences (prompt + reply), and a prompt is run
  only from the end of its longest cached prefix: an episode's next step reads just its last reply and
  observation. The tokens all prompts of a call begin with (instruction, example) are run once.
- Identical prompts in one call (n samples; the N rollouts of a record) are run once, and a prompt that
  begins another of its call (step accuracy's steps of one trajectory) is run as part of it.
- Then all rows decode together; the batch's key/value states live in one preallocated buffer written
  in place (transformers' DynamicCache re-copies the whole cache for every token), only the last
  position goes through the LM head, finished rows leave the batch, and stop strings are checked on
  each row's text as it grows (no per-call stop-string tables, which `generate` rebuilds every call).

Batched greedy decoding gives the same text as one prompt at a time (tested): each prompt is run on
its own, and in the batch each row keeps its own positions and attends only to its own tokens (left
padding under an attention mask). Reusing cached states changes the float rounding of a prompt's
states, not the computation; `prefix_cache_gb=0` turns the cache off (a prompt is then always run
whole, as `model.generate` does).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from eval_agent.llm import Completion, GenerationConfig

# Below this many shared leading tokens, running the common part of a call's prompts once is not worth a pass.
MIN_SHARED_PREFIX = 32


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Text before the first stop string (vLLM returns it that way), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading tokens the id sequences `a` and `b` share."""
    n = min(len(a), len(b))
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def begun_by_shorter(prompts: list[torch.Tensor], shared: int) -> set[bytes]:
    """The prompts a shorter prompt of the same call shares much more with than the `shared` tokens all prompts
    begin with (step accuracy asks for several steps of one expert trajectory at once: each earlier step's prompt
    begins the later ones')."""
    return {p.numpy().tobytes() for p in prompts
            if any(len(q) < len(p) and common_prefix(p, q) >= shared + MIN_SHARED_PREFIX for q in prompts)}


class PrefixCache:
    """Key/value states of recent token sequences, shape [layers, 2, kv_heads, length, head_dim] each.
    The least recently used go beyond `max_tokens`; a sequence that extends a stored one replaces it
    (it serves every prompt the shorter one served)."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # id -> (token ids, states)
        self.tokens = 0
        self._next_id = 0

    def longest(self, ids: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        """The stored states sharing the most leading tokens with `ids`, and how many they share."""
        best, best_id, best_n = None, None, 0
        for entry_id, (stored, states) in self.entries.items():
            n = common_prefix(stored, ids)
            if n > best_n:
                best, best_id, best_n = states, entry_id, n
        if best_id is not None:
            self.entries.move_to_end(best_id)
        return best, best_n

    def add(self, ids: torch.Tensor, states: torch.Tensor) -> None:
        if len(ids) > self.max_tokens:
            return
        for entry_id, (stored, _) in list(self.entries.items()):
            n = common_prefix(stored, ids)
            if n == len(ids):  # already covered by a longer one
                self.entries.move_to_end(entry_id)
                return
            if n == len(stored):
                del self.entries[entry_id]
                self.tokens -= n
        self.entries[self._next_id] = (ids, states)
        self._next_id += 1
        self.tokens += len(ids)
        while self.tokens > self.max_tokens:
            _, (stored, _) = self.entries.popitem(last=False)
            self.tokens -= len(stored)


class InPlaceLayer(DynamicLayer):
    """One layer's key/value states in a preallocated buffer [batch, heads, capacity, head_dim]: new
    tokens are written into it instead of concatenated onto a copy of everything before."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values


def in_place_cache(buffer: torch.Tensor, length: int) -> DynamicCache:
    """A model cache over `buffer` [layers, 2, batch, heads, capacity, head_dim] holding `length` positions."""
    cache = DynamicCache()
    cache.layers = [InPlaceLayer(layer[0], layer[1], length) for layer in buffer]
    return cache


class HFBackend:
    """`batch_size` rows decode together; `prefix_cache_gb` bounds the prefix cache (SmolLM2-135M in float32
    holds 45 KB a token: 4 GB keep ~90k tokens, some 40-60 live episodes of 1.5-2k tokens; 0 turns it off)."""

    def __init__(self, model: str, device: str | None = None, dtype: torch.dtype | None = None,
                 batch_size: int = 16, max_context: int | None = None, prefix_cache_gb: float = 4.0):
        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        dtype = dtype or (torch.bfloat16 if self.device == "cuda" else torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        config = self.model.config
        self.max_context = max_context or getattr(config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.eos_ids:
            self.eos_ids.append(self.tokenizer.eos_token_id)
        other = {t for t in getattr(config, "layer_types", None) or [] if t != "full_attention"}
        if other:  # a sliding window would need its own cache layout
            raise ValueError(f"{model}: {sorted(other)} layers; HFBackend caches full-attention decoders only")
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.state_shape = (config.num_hidden_layers, 2, heads, head_dim)  # per token: [layers, k/v, heads, head_dim]
        token_bytes = config.num_hidden_layers * 2 * heads * head_dim * torch.finfo(dtype).bits // 8
        self.prefix_cache = PrefixCache(int(prefix_cache_gb * 2**30) // token_bytes)
        self.prompt_tokens = 0  # prompt tokens of all rows (what running every prompt whole would cost) ...
        self.prompt_tokens_run = 0  # ... and those that went through the model: the rest came from the cache

    @torch.inference_mode()
    def generate(self, prompts: list[str], config: GenerationConfig) -> list[list[Completion]]:
        if config.seed is not None:
            torch.manual_seed(config.seed)
        ids = [torch.tensor(t, dtype=torch.long) for t in
               (self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else [])]
        rows = [i for i in range(len(prompts)) for _ in range(config.n)]  # n samples per prompt as n rows
        results: list[Completion | None] = [None] * len(rows)
        fits = []
        for r, i in enumerate(rows):
            if self.max_context is not None and len(ids[i]) >= self.max_context:
                results[r] = Completion(text="", finish_reason="context_overflow")
            else:
                fits.append(r)
        # long prompts first so a sub-batch holds similar lengths (stable: equal prompts stay side by side)
        fits.sort(key=lambda r: -len(ids[rows[r]]))
        for start in range(0, len(fits), self.batch_size):
            batch = fits[start: start + self.batch_size]
            for r, c in zip(batch, self._generate_batch([ids[rows[r]] for r in batch], config)):
                results[r] = c
        out: list[list[Completion]] = [[] for _ in prompts]
        for i, c in zip(rows, results):
            out[i].append(c)
        return out

    def _prefill(self, ids: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """Run `ids` from the end of its longest cached prefix, writing its states into `buffer`
        [layers, 2, 1, heads, >= len(ids), head_dim]; the next-token logits."""
        states, n = self.prefix_cache.longest(ids)
        n = min(n, len(ids) - 1)  # at least one token goes through the model: its logits are the answer
        self.prompt_tokens_run += len(ids) - n
        if n:
            buffer[:, :, 0, :, :n] = states[:, :, :, :n]
        out = self.model(input_ids=ids[None, n:].to(self.device), position_ids=torch.arange(n, len(ids), device=self.device)[None],
                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                         cache=in_place_cache(buffer, n), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    def _cache_shared_prefix(self, prompts: list[torch.Tensor], shared: int) -> None:
        """Run the `shared` tokens all `prompts` begin with once, into the prefix cache."""
        if shared < MIN_SHARED_PREFIX or self.prefix_cache.longest(prompts[0][:shared])[1] >= shared:
            return
        layers, kv, heads, head_dim = self.state_shape
        buffer = torch.empty(layers, kv, 1, heads, shared, head_dim, dtype=self.model.dtype, device=self.device)
        self._prefill(prompts[0][:shared], buffer)
        self.prefix_cache.add(prompts[0][:shared], buffer[:, :, 0])

    def _generate_batch(self, prompts: list[torch.Tensor], config: GenerationConfig) -> list[Completion]:
        # Each row's own budget (what it would get alone): a long prompt must not shorten its neighbours.
        budgets = [config.max_new_tokens if self.max_context is None
                   else max(1, min(config.max_new_tokens, self.max_context - len(p))) for p in prompts]
        lengths = [len(p) for p in prompts]
        width = max(lengths)  # rows are left-padded to end together at column `width`
        layers, kv, heads, head_dim = self.state_shape
        buffer = torch.empty(layers, kv, len(prompts), heads, width + max(budgets), head_dim, dtype=self.model.dtype,
                             device=self.device)
        mask = torch.zeros(len(prompts), width + max(budgets), dtype=torch.long, device=self.device)
        by_text: dict[bytes, int] = {}  # one run per distinct prompt
        distinct = list({p.numpy().tobytes(): p for p in prompts}.values())
        self.prompt_tokens += sum(len(p) for p in prompts)
        begins_another: set[bytes] = set()
        if self.prefix_cache.max_tokens > 0 and len(distinct) > 1:
            shared = min(common_prefix(distinct[0], p) for p in distinct[1:])
            self._cache_shared_prefix(distinct, shared)
            begins_another = begun_by_shorter(distinct, shared)
        first_logits = []
        for r, p in enumerate(prompts):
            start = width - len(p)
            buffer[:, :, r, :, :start] = 0  # masked, but 0 * garbage (NaN) would still poison the sum
            mask[r, start:width] = 1
            text = p.numpy().tobytes()
            twin = by_text.setdefault(text, r)
            if twin == r:
                first_logits.append(self._prefill(p, buffer[:, :, r:r + 1, :, start:]))
                if text in begins_another:  # prompts run longest first: the shorter one reuses it
                    self.prefix_cache.add(p, buffer[:, :, r, :, start:width].clone())
            else:
                buffer[:, :, r, :, start:width] = buffer[:, :, twin, :, start:width]
                first_logits.append(first_logits[twin])
        return self._decode(prompts, budgets, buffer, mask, width, torch.stack(first_logits), config)

    def _decode(self, prompts: list[torch.Tensor], budgets: list[int], buffer: torch.Tensor, mask: torch.Tensor,
                width: int, logits: torch.Tensor, config: GenerationConfig) -> list[Completion]:
        """Sample until every row ends (end of sequence, stop string, budget); finished rows leave the batch
        once half of it is done."""
        generated: list[list[int]] = [[] for _ in prompts]
        done: list[Completion | None] = [None] * len(prompts)
        live = list(range(len(prompts)))  # batch row -> prompt
        positions = torch.tensor([len(p) for p in prompts], device=self.device)
        cache, column = in_place_cache(buffer, width), width
        while True:
            tokens = self._pick(logits, config).tolist()
            for r, token in zip(live, tokens):
                if done[r] is None:
                    done[r] = self._step(generated[r], token, budgets[r], config.stop)
            keep = [b for b, r in enumerate(live) if done[r] is None]
            if not keep or 2 * len(keep) <= len(live):  # shrink the batch to the live rows
                for b, r in enumerate(live):
                    if done[r] is not None:
                        self._remember(prompts[r], generated[r], done[r], buffer[:, :, b, :, width - len(prompts[r]):])
                if not keep:
                    break
                index = torch.tensor(keep, device=self.device)
                buffer, mask, positions = buffer.index_select(2, index), mask[index], positions[index]
                live, tokens = [live[b] for b in keep], [tokens[b] for b in keep]
                cache = in_place_cache(buffer, column)
            mask[:, column] = 1
            out = self.model(input_ids=torch.tensor(tokens, device=self.device)[:, None], position_ids=positions[:, None],
                             attention_mask=mask[:, :column + 1], cache=cache, use_cache=True)
            logits, positions, column = out.logits[:, -1].float(), positions + 1, column + 1
        return done  # type: ignore[return-value]

    def _remember(self, prompt: torch.Tensor, generated: list[int], completion: Completion, states: torch.Tensor) -> None:
        """Keep a finished row's states [layers, 2, heads, positions from its first, head_dim] in the prefix
        cache: the episode's next prompt begins with this prompt and reply. The last token of a row that did
        not end on end-of-sequence was sampled but never run."""
        if self.prefix_cache.max_tokens <= 0:
            return
        ended_on_eos = completion.num_tokens > len(generated)
        run = generated if ended_on_eos else generated[:-1]
        seq = torch.cat([prompt, torch.tensor(run, dtype=torch.long)])
        self.prefix_cache.add(seq, states[:, :, :, :len(seq)].clone())

    def _step(self, generated: list[int], token: int, budget: int, stop: tuple[str, ...]) -> Completion | None:
        """Take one sampled token; the finished completion when the row ends here."""
        if token in self.eos_ids:  # the end-of-sequence token is counted, not shown
            return Completion(text=cut_at_stop(self._text(generated), stop)[0], num_tokens=len(generated) + 1)
        generated.append(token)
        text, stopped = cut_at_stop(self._text(generated), stop)
        if stopped or len(generated) >= budget:
            return Completion(text=text, num_tokens=len(generated), finish_reason="stop" if stopped else "length")
        return None

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _pick(logits: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
        """Next token per row: argmax, or a draw at `temperature` from the top-p nucleus."""
        if config.temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / config.temperature, dim=-1)
        order = None
        if config.top_p < 1:
            probs, order = probs.sort(dim=-1, descending=True)
            probs = probs * (probs.cumsum(-1) - probs < config.top_p)  # keep tokens until top_p is reached
        # inverse-CDF draw: one uniform number a row (torch.multinomial costs ~1-3 ms a row on a 49k vocabulary)
        cdf = probs.cumsum(-1)
        u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        return (picked if order is None else order.gather(-1, picked)).squeeze(-1)
