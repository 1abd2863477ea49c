// Sample index of packed training sequences, blending, and precomputed noise seeds.
//
// For one token shard and one split (a contiguous range of documents), the Python side
// (card_megatron/data/index.py) calls, in order:
//   build_document_index  the split's document ids, one independently shuffled copy per
//                         epoch, concatenated: the "epoch stream" of documents;
//   build_sample_index    [N+1, 2] (position in the document index, token offset) of
//                         token i*L of that stream: sample i covers stream tokens
//                         [i*L, i*L+L] (L+1 tokens; consecutive samples share one token);
//   build_shuffle_index   a permutation of the N sample ids, shuffled within each epoch;
//   build_blend_index     for several shards: which shard serves each position of the
//                         split's sample stream (greedy "most under-served next" rule);
//   noise_seeds           noise_seed(seed, split, k) for each stream position k.
//
// All randomness comes from SplitMix64 (docs/design.md "Noise"): mix(z) below, and a
// shuffle stream whose t-th 64-bit draw is mix(key + t * 0x9E3779B97F4A7C15), turned into
// a bounded integer with Lemire's multiply-shift rejection method and used by a
// Fisher-Yates shuffle from the last element down. Everything is exact integer arithmetic,
// so indices are identical on every platform and in the NumPy references of the tests.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix(uint64_t z) {
  z += kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// SplitMix64 stream: draw t is mix(key + t * golden).
struct ShuffleRng {
  uint64_t state;
  explicit ShuffleRng(uint64_t key) : state(key) {}
  inline uint64_t next() {
    uint64_t r = mix(state);
    state += kGolden;
    return r;
  }
  // Uniform integer in [0, range), range >= 1 (Lemire 2019, unbiased).
  inline uint64_t bounded(uint64_t range) {
    unsigned __int128 m = static_cast<unsigned __int128>(next()) * range;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < range) {
      const uint64_t threshold = (0 - range) % range;
      while (low < threshold) {
        m = static_cast<unsigned __int128>(next()) * range;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }
};

// Draws are consumed in the textbook order (i = n-1 down to 1); they are only computed
// kAhead steps early so that the random element a[j] can be prefetched.
template <typename T>
void fisher_yates(T* a, int64_t n, uint64_t key) {
  constexpr int64_t kAhead = 32;
  ShuffleRng rng(key);
  int64_t ring[kAhead];
  for (int64_t t = 0; t < kAhead && n - 1 - t > 0; ++t) {
    ring[t] = static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(n - t)));
    __builtin_prefetch(a + ring[t], 1);
  }
  for (int64_t i = n - 1, t = 0; i > 0; --i, ++t) {
    const int64_t slot = t % kAhead;
    const int64_t j = ring[slot];
    const int64_t ahead = i - kAhead;
    if (ahead > 0) {
      ring[slot] = static_cast<int64_t>(rng.bounded(static_cast<uint64_t>(ahead) + 1));
      __builtin_prefetch(a + ring[slot], 1);
    }
    const T tmp = a[i];
    a[i] = a[j];
    a[j] = tmp;
  }
}

// The key of epoch e's shuffle, derived from the caller's key.
inline uint64_t epoch_key(uint64_t key, int64_t epoch) { return mix(key ^ static_cast<uint64_t>(epoch)); }

// ----------------------------------------------------------------------------- noise seeds

py::array_t<uint64_t> splitmix64(py::array_t<uint64_t, py::array::c_style | py::array::forcecast> x) {
  const int64_t n = x.size();
  py::array_t<uint64_t> out(x.request().shape);
  const uint64_t* in = x.data();
  uint64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) o[i] = mix(in[i]);
  }
  return out;
}

py::array_t<uint64_t> noise_seeds(uint64_t seed, uint64_t split, int64_t start, int64_t count) {
  if (count < 0 || start < 0) throw std::invalid_argument("noise_seeds: start and count must be >= 0");
  py::array_t<uint64_t> out(count);
  uint64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    const uint64_t base = mix(mix(seed) ^ split);
    for (int64_t k = 0; k < count; ++k) o[k] = mix(base ^ static_cast<uint64_t>(start + k));
  }
  return out;
}

// ----------------------------------------------------------------------------- documents

template <typename T>
py::array build_document_index_t(int64_t doc_begin, int64_t doc_end, int64_t num_epochs, uint64_t key) {
  const int64_t n = doc_end - doc_begin;
  py::array_t<T> out(n * num_epochs);
  T* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t e = 0; e < num_epochs; ++e) {
      T* epoch = o + e * n;
      for (int64_t i = 0; i < n; ++i) epoch[i] = static_cast<T>(doc_begin + i);
      fisher_yates(epoch, n, epoch_key(key, e));
    }
  }
  return out;
}

py::array build_document_index(int64_t doc_begin, int64_t doc_end, int64_t num_epochs, uint64_t key) {
  if (doc_begin < 0 || doc_end < doc_begin || num_epochs < 0)
    throw std::invalid_argument("build_document_index: need 0 <= doc_begin <= doc_end and num_epochs >= 0, got " +
                                std::to_string(doc_begin) + ", " + std::to_string(doc_end) + ", " +
                                std::to_string(num_epochs));
  if (doc_end - 1 <= std::numeric_limits<int32_t>::max())
    return build_document_index_t<int32_t>(doc_begin, doc_end, num_epochs, key);
  return build_document_index_t<int64_t>(doc_begin, doc_end, num_epochs, key);
}

// ----------------------------------------------------------------------------- packing

// Walks the documents of the epoch stream once; sample boundary i (i = 0..N) is stream
// token i*L, recorded as (position p in document_index, offset inside that document).
// A boundary on the last token of a document stays in that document (not (p+1, 0)),
// so sample i is read from boundary i to boundary i+1 inclusive.
template <typename D, typename S>
void pack(const int32_t* sizes, int64_t num_docs_total, const D* doc_index, int64_t num_positions,
          int64_t seq_length, int64_t num_samples, S* out) {
  int64_t boundary = 0;      // stream token of the next boundary to record
  int64_t doc_start = 0;     // stream token where the document at position p starts
  int64_t recorded = 0;
  constexpr int64_t kPrefetch = 16;
  for (int64_t p = 0; p < num_positions && recorded <= num_samples; ++p) {
    if (p + kPrefetch < num_positions) __builtin_prefetch(sizes + doc_index[p + kPrefetch]);
    const int64_t doc = static_cast<int64_t>(doc_index[p]);
    if (doc < 0 || doc >= num_docs_total) throw std::out_of_range("build_sample_index: document id out of range");
    const int64_t doc_end = doc_start + sizes[doc];
    while (boundary < doc_end && recorded <= num_samples) {
      out[2 * recorded] = static_cast<S>(p);
      out[2 * recorded + 1] = static_cast<S>(boundary - doc_start);
      ++recorded;
      boundary += seq_length;
    }
    doc_start = doc_end;
  }
  if (recorded != num_samples + 1)
    throw std::invalid_argument("build_sample_index: the document stream holds " + std::to_string(doc_start) +
                                " tokens, too few for " + std::to_string(num_samples) + " samples of " +
                                std::to_string(seq_length) + "+1 tokens");
}

template <typename D>
py::array build_sample_index_d(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes,
                               const py::array_t<D, py::array::c_style>& doc_index, int64_t seq_length,
                               int64_t num_samples) {
  const int64_t num_positions = doc_index.size();
  const bool small = num_positions <= std::numeric_limits<int32_t>::max();
  auto run = [&](auto* dummy) -> py::array {
    using S = std::remove_pointer_t<decltype(dummy)>;
    py::array_t<S> out({num_samples + 1, static_cast<int64_t>(2)});
    S* o = out.mutable_data();
    const int32_t* sz = sizes.data();
    const D* di = doc_index.data();
    const int64_t nd = sizes.size();
    {
      py::gil_scoped_release release;
      pack<D, S>(sz, nd, di, num_positions, seq_length, num_samples, o);
    }
    return out;
  };
  if (small) return run(static_cast<int32_t*>(nullptr));
  return run(static_cast<int64_t*>(nullptr));
}

py::array build_sample_index(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes,
                             const py::array& doc_index, int64_t seq_length, int64_t num_samples) {
  if (seq_length < 1) throw std::invalid_argument("build_sample_index: seq_length must be >= 1");
  if (num_samples < 0) throw std::invalid_argument("build_sample_index: num_samples must be >= 0");
  if (doc_index.ndim() != 1) throw std::invalid_argument("build_sample_index: document_index must be 1-D");
  if (py::isinstance<py::array_t<int32_t>>(doc_index))
    return build_sample_index_d<int32_t>(sizes, doc_index.cast<py::array_t<int32_t, py::array::c_style>>(),
                                         seq_length, num_samples);
  if (py::isinstance<py::array_t<int64_t>>(doc_index))
    return build_sample_index_d<int64_t>(sizes, doc_index.cast<py::array_t<int64_t, py::array::c_style>>(),
                                         seq_length, num_samples);
  throw std::invalid_argument("build_sample_index: document_index must be int32 or int64");
}

// ----------------------------------------------------------------------------- shuffling

template <typename T>
py::array build_shuffle_index_t(const int64_t* starts, int64_t num_epochs, uint64_t key) {
  const int64_t n = starts[num_epochs];
  py::array_t<T> out(n);
  T* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(i);
    for (int64_t e = 0; e < num_epochs; ++e)
      fisher_yates(o + starts[e], starts[e + 1] - starts[e], epoch_key(key, e));
  }
  return out;
}

py::array build_shuffle_index(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& epoch_starts,
                              uint64_t key) {
  const int64_t num_epochs = epoch_starts.size() - 1;
  if (epoch_starts.ndim() != 1 || num_epochs < 0)
    throw std::invalid_argument("build_shuffle_index: epoch_starts must be 1-D with at least one entry");
  const int64_t* s = epoch_starts.data();
  if (s[0] != 0) throw std::invalid_argument("build_shuffle_index: epoch_starts[0] must be 0");
  for (int64_t e = 0; e < num_epochs; ++e)
    if (s[e + 1] < s[e]) throw std::invalid_argument("build_shuffle_index: epoch_starts must be non-decreasing");
  if (s[num_epochs] < static_cast<int64_t>(std::numeric_limits<uint32_t>::max()))
    return build_shuffle_index_t<uint32_t>(s, num_epochs, key);
  return build_shuffle_index_t<int64_t>(s, num_epochs, key);
}

// ----------------------------------------------------------------------------- blending

// Position k of the blended stream goes to the dataset d maximising
// weights[d] * (k + 1) - served[d] (the most under-served one after this sample),
// the lowest d on ties; weights are normalised to sum to 1 here.
template <typename I>
py::tuple build_blend_index_t(const std::vector<double>& w, int64_t size) {
  const int64_t nd = static_cast<int64_t>(w.size());
  py::array_t<I> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  I* di = dataset_index.mutable_data();
  int64_t* dsi = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> served(nd, 0);
    for (int64_t k = 0; k < size; ++k) {
      const double target = static_cast<double>(k + 1);
      int64_t best = 0;
      double best_gap = w[0] * target - static_cast<double>(served[0]);
      for (int64_t d = 1; d < nd; ++d) {
        const double gap = w[d] * target - static_cast<double>(served[d]);
        if (gap > best_gap) {
          best_gap = gap;
          best = d;
        }
      }
      di[k] = static_cast<I>(best);
      dsi[k] = served[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

py::tuple build_blend_index(const py::array_t<double, py::array::c_style | py::array::forcecast>& weights,
                            int64_t size) {
  const int64_t nd = weights.size();
  if (nd < 1 || nd > std::numeric_limits<int16_t>::max())
    throw std::invalid_argument("build_blend_index: need between 1 and 32767 datasets, got " + std::to_string(nd));
  if (size < 0) throw std::invalid_argument("build_blend_index: size must be >= 0");
  double total = 0.0;
  for (int64_t d = 0; d < nd; ++d) {
    if (!(weights.data()[d] > 0.0)) throw std::invalid_argument("build_blend_index: weights must be positive");
    total += weights.data()[d];
  }
  std::vector<double> w(nd);
  for (int64_t d = 0; d < nd; ++d) w[d] = weights.data()[d] / total;
  if (nd <= 255) return build_blend_index_t<uint8_t>(w, size);
  return build_blend_index_t<int16_t>(w, size);
}

}  // namespace

void register_sample_index(py::module_& m) {
  m.def("splitmix64", &splitmix64, py::arg("x"), "SplitMix64 mix(z) of every element (uint64 -> uint64).");
  m.def("noise_seeds", &noise_seeds, py::arg("seed"), py::arg("split"), py::arg("start"), py::arg("count"),
        "uint64[count]: mix(mix(mix(seed) ^ split) ^ k) for k in [start, start + count).");
  m.def("build_document_index", &build_document_index, py::arg("doc_begin"), py::arg("doc_end"),
        py::arg("num_epochs"), py::arg("key"),
        "int32|int64[num_epochs * (doc_end - doc_begin)]: each epoch a shuffle of [doc_begin, doc_end).");
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("document_index"),
        py::arg("seq_length"), py::arg("num_samples"),
        "int32|int64[num_samples + 1, 2]: (document_index position, offset) of stream token i * seq_length.");
  m.def("build_shuffle_index", &build_shuffle_index, py::arg("epoch_starts"), py::arg("key"),
        "uint32|int64[epoch_starts[-1]]: sample ids, shuffled within [epoch_starts[e], epoch_starts[e+1]).");
  m.def("build_blend_index", &build_blend_index, py::arg("weights"), py::arg("size"),
        "(uint8|int16[size] dataset, int64[size] sample within dataset) by the most-under-served rule.");
}
