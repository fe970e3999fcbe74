// splice: base64 streams (RFC 4648 alphabet, '=' padding) as TVM's tensor JSON hooks use them
// from "support/base64.h": Base64OutStream encodes what is written into another stream (Finish
// flushes the last group), Base64InStream decodes another stream (InitPosition skips leading
// whitespace; whitespace between groups is ignored).
#ifndef SPLICE_TVM_SUPPORT_BASE64_H_
#define SPLICE_TVM_SUPPORT_BASE64_H_

#include <tvm/ffi/error.h>
#include <tvm/support/io.h>

#include <cstdint>
#include <cstring>

namespace tvm {
namespace support {

namespace base64 {
inline const char* Alphabet() {
  return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
}
// the 6-bit value of c, -1 for '=' and -2 for anything else
inline int Value(int c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  if (c == '=') return -1;
  return -2;
}
inline bool IsSpace(int c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
}  // namespace base64

class Base64OutStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit Base64OutStream(Stream* out) : out_(out) {}

  size_t Write(const void* ptr, size_t size) override {
    const uint8_t* p = static_cast<const uint8_t*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      group_[filled_++] = p[i];
      if (filled_ == 3) Flush();
    }
    return size;
  }
  size_t Read(void*, size_t) override {
    TVM_FFI_THROW(InternalError) << "Base64OutStream is write-only";
    return 0;
  }
  // encode the last, partial group with '=' padding
  void Finish() {
    if (filled_ != 0) Flush();
  }

 private:
  void Flush() {
    const char* a = base64::Alphabet();
    uint32_t v = (uint32_t(group_[0]) << 16) | (filled_ > 1 ? uint32_t(group_[1]) << 8 : 0) |
                 (filled_ > 2 ? uint32_t(group_[2]) : 0);
    char text[4] = {a[(v >> 18) & 63], a[(v >> 12) & 63], filled_ > 1 ? a[(v >> 6) & 63] : '=',
                    filled_ > 2 ? a[v & 63] : '='};
    out_->Write(static_cast<const void*>(text), 4);
    filled_ = 0;
  }
  Stream* out_;
  uint8_t group_[3] = {0, 0, 0};
  int filled_ = 0;
};

class Base64InStream : public Stream {
 public:
  using Stream::Read;
  using Stream::Write;
  explicit Base64InStream(Stream* in) : in_(in) {}

  // skip whitespace before the first group
  void InitPosition() {
    char c;
    while (in_->Read(&c, 1) == 1) {
      if (!base64::IsSpace(static_cast<unsigned char>(c))) {
        pending_ = c;
        has_pending_ = true;
        return;
      }
    }
  }
  size_t Read(void* ptr, size_t size) override {
    uint8_t* p = static_cast<uint8_t*>(ptr);
    size_t n = 0;
    while (n < size) {
      if (pos_ == len_ && !Decode()) break;
      p[n++] = bytes_[pos_++];
    }
    return n;
  }
  size_t Write(const void*, size_t) override {
    TVM_FFI_THROW(InternalError) << "Base64InStream is read-only";
    return 0;
  }

 private:
  bool NextChar(char* c) {
    if (has_pending_) {
      has_pending_ = false;
      *c = pending_;
      return true;
    }
    while (in_->Read(c, 1) == 1) {
      if (!base64::IsSpace(static_cast<unsigned char>(*c))) return true;
    }
    return false;
  }
  // decode the next group of four characters into bytes_; false at the end of the data
  bool Decode() {
    if (done_) return false;
    int v[4];
    for (int i = 0; i < 4; ++i) {
      char c;
      if (!NextChar(&c)) {
        TVM_FFI_ICHECK_EQ(i, 0) << "base64 data ends inside a group";
        done_ = true;
        return false;
      }
      v[i] = base64::Value(static_cast<unsigned char>(c));
      TVM_FFI_ICHECK(v[i] != -2) << "invalid base64 character " << c;
    }
    TVM_FFI_ICHECK(v[0] >= 0 && v[1] >= 0) << "invalid base64 padding";
    uint32_t bits = (uint32_t(v[0]) << 18) | (uint32_t(v[1]) << 12) |
                    (v[2] >= 0 ? uint32_t(v[2]) << 6 : 0) | (v[3] >= 0 ? uint32_t(v[3]) : 0);
    bytes_[0] = uint8_t(bits >> 16);
    bytes_[1] = uint8_t(bits >> 8);
    bytes_[2] = uint8_t(bits);
    len_ = v[2] < 0 ? 1 : v[3] < 0 ? 2 : 3;
    if (len_ < 3) done_ = true;
    pos_ = 0;
    return true;
  }
  Stream* in_;
  char pending_ = 0;
  bool has_pending_ = false;
  bool done_ = false;
  uint8_t bytes_[3] = {0, 0, 0};
  size_t len_ = 0;
  size_t pos_ = 0;
};

}  // namespace support
}  // namespace tvm

#endif  // SPLICE_TVM_SUPPORT_BASE64_H_
