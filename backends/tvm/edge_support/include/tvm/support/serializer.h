// splice: Serializer<T> for the types TVM's runtime sources read and write (see io.h). The
// layout, which must match the one TVM's own build writes into an exported library (the
// executable's sections, tensors, module blobs): trivially copyable values (integers, floats,
// enums, DLDataType, DLDevice) as their little-endian bytes; a string as a uint64 length and its
// bytes; a vector as a uint64 count and its elements (raw bytes when they are trivially
// copyable); a pair as its two members; a class with Save(Stream*) / Load(Stream*) members
// through them. ffi::String and ffi::Array (a device module's function table) are laid out as
// std::string and std::vector.
#ifndef SPLICE_TVM_SUPPORT_SERIALIZER_H_
#define SPLICE_TVM_SUPPORT_SERIALIZER_H_

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace tvm {
namespace support {

template <typename T>
struct Serializer<T, std::enable_if_t<std::is_trivially_copyable_v<T>>> {
  static void Write(Stream* s, const T& v) { s->Write(static_cast<const void*>(&v), sizeof(T)); }
  static bool Read(Stream* s, T* v) {
    return s->Read(static_cast<void*>(v), sizeof(T)) == sizeof(T);
  }
};

template <>
struct Serializer<std::string> {
  static void Write(Stream* s, const std::string& v) {
    uint64_t n = v.size();
    s->Write(static_cast<const void*>(&n), sizeof(n));
    if (n != 0) s->Write(static_cast<const void*>(v.data()), n);
  }
  static bool Read(Stream* s, std::string* v) {
    uint64_t n;
    if (s->Read(static_cast<void*>(&n), sizeof(n)) != sizeof(n)) return false;
    v->resize(static_cast<size_t>(n));
    return n == 0 || s->Read(static_cast<void*>(&(*v)[0]), n) == n;
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static void Write(Stream* s, const std::vector<T>& v) {
    uint64_t n = v.size();
    s->Write(static_cast<const void*>(&n), sizeof(n));
    if constexpr (std::is_trivially_copyable_v<T>) {
      if (n != 0) s->Write(static_cast<const void*>(v.data()), n * sizeof(T));
    } else {
      for (const T& e : v) Serializer<T>::Write(s, e);
    }
  }
  static bool Read(Stream* s, std::vector<T>* v) {
    uint64_t n;
    if (s->Read(static_cast<void*>(&n), sizeof(n)) != sizeof(n)) return false;
    v->resize(static_cast<size_t>(n));
    if constexpr (std::is_trivially_copyable_v<T>) {
      size_t bytes = static_cast<size_t>(n) * sizeof(T);
      return n == 0 || s->Read(static_cast<void*>(v->data()), bytes) == bytes;
    } else {
      for (T& e : *v) {
        if (!Serializer<T>::Read(s, &e)) return false;
      }
      return true;
    }
  }
};

template <>
struct Serializer<ffi::String> {
  static void Write(Stream* s, const ffi::String& v) {
    uint64_t n = v.size();
    s->Write(static_cast<const void*>(&n), sizeof(n));
    if (n != 0) s->Write(static_cast<const void*>(v.data()), n);
  }
  static bool Read(Stream* s, ffi::String* v) {
    std::string text;
    if (!Serializer<std::string>::Read(s, &text)) return false;
    *v = ffi::String(std::move(text));
    return true;
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static void Write(Stream* s, const ffi::Array<T>& v) {
    uint64_t n = v.size();
    s->Write(static_cast<const void*>(&n), sizeof(n));
    for (const T& e : v) Serializer<T>::Write(s, e);
  }
  static bool Read(Stream* s, ffi::Array<T>* v) {
    uint64_t n;
    if (s->Read(static_cast<void*>(&n), sizeof(n)) != sizeof(n)) return false;
    ffi::Array<T> out;
    for (uint64_t i = 0; i < n; ++i) {
      T e;
      if (!Serializer<T>::Read(s, &e)) return false;
      out.push_back(e);
    }
    *v = std::move(out);
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>, std::enable_if_t<!std::is_trivially_copyable_v<std::pair<A, B>>>> {
  static void Write(Stream* s, const std::pair<A, B>& v) {
    Serializer<A>::Write(s, v.first);
    Serializer<B>::Write(s, v.second);
  }
  static bool Read(Stream* s, std::pair<A, B>* v) {
    return Serializer<A>::Read(s, &v->first) && Serializer<B>::Read(s, &v->second);
  }
};

// a class that serialises itself (the VM's function table entries)
template <typename T, typename = void>
struct HasSaveLoad : std::false_type {};
template <typename T>
struct HasSaveLoad<T, std::void_t<decltype(std::declval<const T&>().Save(std::declval<Stream*>())),
                                  decltype(std::declval<T&>().Load(std::declval<Stream*>()))>>
    : std::true_type {};

template <typename T>
struct Serializer<T, std::enable_if_t<!std::is_trivially_copyable_v<T> && HasSaveLoad<T>::value>> {
  static void Write(Stream* s, const T& v) { v.Save(s); }
  static bool Read(Stream* s, T* v) { return v->Load(s); }
};

}  // namespace support
}  // namespace tvm

#endif  // SPLICE_TVM_SUPPORT_SERIALIZER_H_
