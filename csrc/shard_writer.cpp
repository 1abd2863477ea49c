// Streaming writer of Megatron MMIDIDX (version 1) token shards.
//
// Layout written (little endian), identical to megatron.core.datasets.indexed_dataset:
//   .bin  the tokens of every sequence, back to back, in the shard's dtype
//   .idx  "MMIDIDX\0\0"  u64 version = 1  u8 dtype code  u64 sequence count S
//         u64 document count D   i32 lengths[S]   i64 byte pointers[S]
//         i64 document indices[D]  (0, then the sequence index one past each document)
//
// Memory stays bounded whatever the corpus size: tokens go straight to the .bin file,
// lengths and document ends to two side files; finalize() assembles the .idx by
// streaming those side files (the pointers are the running byte offsets of the lengths).
// The caller chooses the (temporary) paths and renames them once finalize() returns.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr size_t kIoBuffer = 1 << 20;

// Megatron's DType codes for the integer token types.
size_t itemsize_of_code(int code) {
  switch (code) {
    case 1:  // uint8
    case 2:  // int8
      return 1;
    case 3:  // int16
    case 8:  // uint16
      return 2;
    case 4:  // int32
      return 4;
    case 5:  // int64
      return 8;
    default:
      throw py::value_error("unsupported token dtype code " + std::to_string(code) +
                            " (integer codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)");
  }
}

// A failed system call on a file: raised in Python as OSError(errno, strerror, path), so that the
// caller can tell a full disk (ENOSPC) from other failures and name the file (see
// register_shard_writer's exception translator).
class IoError : public std::runtime_error {
 public:
  IoError(const std::string& what, std::string path, int err)
      : std::runtime_error(what + " " + path + ": " + std::strerror(err)), path_(std::move(path)), errno_(err) {}
  const std::string& path() const { return path_; }
  int error_number() const { return errno_; }

 private:
  std::string path_;
  int errno_;
};

IoError io_error(const std::string& what, const std::string& path) {
  const int err = errno;  // read first: building the message may change it
  return IoError(what, path, err ? err : EIO);
}

class File {
 public:
  File() = default;
  File(const std::string& path, const char* mode) : path_(path) {
    f_ = std::fopen(path.c_str(), mode);
    if (!f_) throw io_error("cannot open", path);
    std::setvbuf(f_, nullptr, _IOFBF, kIoBuffer);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (f_) std::fclose(f_);
  }
  void write(const void* data, size_t n) {
    if (n && std::fwrite(data, 1, n, f_) != n) throw io_error("write failed on", path_);
  }
  size_t read(void* data, size_t n) {
    size_t got = std::fread(data, 1, n, f_);
    if (got < n && std::ferror(f_)) throw io_error("read failed on", path_);
    return got;
  }
  void close() {
    if (f_) {
      int rc = std::fclose(f_);
      f_ = nullptr;
      if (rc != 0) throw io_error("close failed on", path_);
    }
  }
  bool is_open() const { return f_ != nullptr; }
  const std::string& path() const { return path_; }

 private:
  std::FILE* f_ = nullptr;
  std::string path_;
};

class ShardWriter {
 public:
  ShardWriter(std::string bin_path, std::string idx_path, int dtype_code)
      : bin_path_(std::move(bin_path)),
        idx_path_(std::move(idx_path)),
        lengths_path_(idx_path_ + ".lengths"),
        ends_path_(idx_path_ + ".docends"),
        dtype_code_(dtype_code),
        itemsize_(itemsize_of_code(dtype_code)) {
    bin_ = std::make_unique<File>(bin_path_, "wb");
    lengths_ = std::make_unique<File>(lengths_path_, "wb");
    ends_ = std::make_unique<File>(ends_path_, "wb");
  }

  ~ShardWriter() {
    if (!finalized_) abort_noexcept();
  }

  // Appends sequences without closing a document. tokens: 1-D contiguous buffer of the
  // shard's dtype; lengths: one entry per sequence, summing to len(tokens).
  void add_sequences(const py::buffer& tokens, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths) {
    append(tokens, lengths, /*close_documents=*/false);
  }

  // Appends sequences, each one a whole document.
  void add_documents(const py::buffer& tokens, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths) {
    append(tokens, lengths, /*close_documents=*/true);
  }

  // Records document boundaries: absolute sequence indices one past each document's
  // last sequence, increasing, each <= the number of sequences written so far.
  void add_document_ends(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ends) {
    check_open();
    auto e = ends.unchecked<1>();
    int64_t prev = last_end_;
    for (py::ssize_t i = 0; i < e.shape(0); ++i) {
      if (e(i) < prev || e(i) > static_cast<int64_t>(num_sequences_))
        throw py::value_error("document ends must be non-decreasing and <= the number of sequences written (" +
                              std::to_string(num_sequences_) + "), got " + std::to_string(e(i)));
      prev = e(i);
    }
    {
      py::gil_scoped_release release;
      ends_->write(e.data(0), sizeof(int64_t) * e.shape(0));
    }
    last_end_ = prev;
    num_documents_ += e.shape(0);
  }

  // Closes the .bin and writes the .idx; returns (sequences, documents, tokens).
  py::tuple finalize() {
    check_open();
    if (last_end_ != static_cast<int64_t>(num_sequences_))
      throw py::value_error("the last " + std::to_string(num_sequences_ - last_end_) +
                            " sequences belong to no document (call add_document_ends)");
    {
      py::gil_scoped_release release;
      bin_->close();
      lengths_->close();
      ends_->close();
      write_index();
      std::remove(lengths_path_.c_str());
      std::remove(ends_path_.c_str());
    }
    finalized_ = true;
    return py::make_tuple(num_sequences_, num_documents_, num_tokens_);
  }

  // Closes and deletes every file this writer created.
  void abort() {
    abort_noexcept();
    finalized_ = true;
  }

  uint64_t num_sequences() const { return num_sequences_; }
  uint64_t num_documents() const { return num_documents_; }
  uint64_t num_tokens() const { return num_tokens_; }
  int dtype_code() const { return dtype_code_; }

 private:
  void check_open() const {
    if (finalized_) throw py::value_error("shard writer for " + bin_path_ + " is already finalized or aborted");
  }

  void append(const py::buffer& tokens, const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& lengths,
              bool close_documents) {
    check_open();
    py::buffer_info info = tokens.request();
    if (info.ndim != 1) throw py::value_error("tokens must be a 1-D array");
    if (static_cast<size_t>(info.itemsize) != itemsize_)
      throw py::value_error("tokens have itemsize " + std::to_string(info.itemsize) + ", the shard's dtype has " +
                            std::to_string(itemsize_));
    if (info.shape[0] > 1 && info.strides[0] != info.itemsize) throw py::value_error("tokens must be contiguous");
    auto l = lengths.unchecked<1>();
    const py::ssize_t n = l.shape(0);
    int64_t total = 0;
    for (py::ssize_t i = 0; i < n; ++i) {
      if (l(i) < 0 || l(i) > INT32_MAX) throw py::value_error("sequence length out of range: " + std::to_string(l(i)));
      total += l(i);
    }
    if (total != info.shape[0])
      throw py::value_error("lengths sum to " + std::to_string(total) + " but " + std::to_string(info.shape[0]) +
                            " tokens were given");
    std::vector<int32_t> lengths32(n);
    for (py::ssize_t i = 0; i < n; ++i) lengths32[i] = static_cast<int32_t>(l(i));
    std::vector<int64_t> ends;
    if (close_documents) {
      ends.resize(n);
      for (py::ssize_t i = 0; i < n; ++i) ends[i] = static_cast<int64_t>(num_sequences_) + i + 1;
    }
    {
      py::gil_scoped_release release;
      bin_->write(info.ptr, static_cast<size_t>(total) * itemsize_);
      lengths_->write(lengths32.data(), sizeof(int32_t) * n);
      if (close_documents) ends_->write(ends.data(), sizeof(int64_t) * n);
    }
    num_sequences_ += n;
    num_tokens_ += total;
    if (close_documents) {
      num_documents_ += n;
      last_end_ = static_cast<int64_t>(num_sequences_);
    }
  }

  // Runs without the GIL: streams the side files into the .idx.
  void write_index() {
    File idx(idx_path_, "wb");
    const uint64_t version = 1;
    const uint8_t code = static_cast<uint8_t>(dtype_code_);
    const uint64_t doc_count = num_documents_ + 1;  // Megatron counts the leading 0
    idx.write(kMagic, sizeof(kMagic));
    idx.write(&version, sizeof(version));
    idx.write(&code, sizeof(code));
    idx.write(&num_sequences_, sizeof(num_sequences_));
    idx.write(&doc_count, sizeof(doc_count));

    std::vector<char> buf(kIoBuffer);
    {  // lengths, copied as they are
      File in(lengths_path_, "rb");
      uint64_t copied = 0;
      for (size_t got; (got = in.read(buf.data(), buf.size())) > 0;) {
        idx.write(buf.data(), got);
        copied += got;
      }
      if (copied != num_sequences_ * sizeof(int32_t)) throw std::runtime_error("short lengths side file " + lengths_path_);
    }
    {  // pointers: running byte offsets
      File in(lengths_path_, "rb");
      std::vector<int32_t> lens(kIoBuffer / sizeof(int32_t));
      std::vector<int64_t> ptrs(lens.size());
      int64_t offset = 0;
      for (size_t got; (got = in.read(lens.data(), lens.size() * sizeof(int32_t))) > 0;) {
        size_t k = got / sizeof(int32_t);
        for (size_t i = 0; i < k; ++i) {
          ptrs[i] = offset;
          offset += static_cast<int64_t>(lens[i]) * static_cast<int64_t>(itemsize_);
        }
        idx.write(ptrs.data(), k * sizeof(int64_t));
      }
    }
    {  // document indices: 0, then the recorded ends
      const int64_t zero = 0;
      idx.write(&zero, sizeof(zero));
      File in(ends_path_, "rb");
      uint64_t copied = 0;
      for (size_t got; (got = in.read(buf.data(), buf.size())) > 0;) {
        idx.write(buf.data(), got);
        copied += got;
      }
      if (copied != num_documents_ * sizeof(int64_t)) throw std::runtime_error("short document side file " + ends_path_);
    }
    idx.close();
  }

  void abort_noexcept() {
    for (auto* f : {bin_.get(), lengths_.get(), ends_.get()}) {
      if (f && f->is_open()) {
        try {
          f->close();
        } catch (...) {
        }
      }
    }
    for (const auto& p : {bin_path_, idx_path_, lengths_path_, ends_path_}) std::remove(p.c_str());
  }

  std::string bin_path_, idx_path_, lengths_path_, ends_path_;
  int dtype_code_;
  size_t itemsize_;
  std::unique_ptr<File> bin_, lengths_, ends_;
  uint64_t num_sequences_ = 0, num_documents_ = 0, num_tokens_ = 0;
  int64_t last_end_ = 0;
  bool finalized_ = false;
};

}  // namespace

void register_shard_writer(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const IoError& e) {
      errno = e.error_number();
      PyErr_SetFromErrnoWithFilename(PyExc_OSError, e.path().c_str());
    }
  });
  py::class_<ShardWriter>(m, "ShardWriter",
                          "Streaming writer of a Megatron MMIDIDX v1 .bin/.idx pair at the given (temporary) paths.")
      .def(py::init<std::string, std::string, int>(), py::arg("bin_path"), py::arg("idx_path"), py::arg("dtype_code"))
      .def("add_documents", &ShardWriter::add_documents, py::arg("tokens"), py::arg("lengths"),
           "Append sequences (tokens: 1-D, shard dtype; lengths: [n]), each a whole document.")
      .def("add_sequences", &ShardWriter::add_sequences, py::arg("tokens"), py::arg("lengths"),
           "Append sequences without closing a document.")
      .def("add_document_ends", &ShardWriter::add_document_ends, py::arg("ends"),
           "Record document ends (absolute sequence indices, one past each document).")
      .def("finalize", &ShardWriter::finalize, "Write the .idx; returns (num_sequences, num_documents, num_tokens).")
      .def("abort", &ShardWriter::abort, "Close and delete every file written.")
      .def_property_readonly("num_sequences", &ShardWriter::num_sequences)
      .def_property_readonly("num_documents", &ShardWriter::num_documents)
      .def_property_readonly("num_tokens", &ShardWriter::num_tokens)
      .def_property_readonly("dtype_code", &ShardWriter::dtype_code);
}
