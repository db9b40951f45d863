// Run-time choice of the kernel path: one table pointer, filled at start-up from cpuid
// (best supported path) unless ONEBIT_KERNEL=avx512|avx2|portable names another supported
// one; set_path() changes it later. Calls read the pointer once, so a concurrent change is
// harmless (each call runs entirely on one path).
#include <atomic>
#include <cstdlib>

#include "onebit_kernels.hpp"

namespace onebit {
namespace {

bool cpu_has_avx512() {
#if defined(ONEBIT_X86) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq") &&
           __builtin_cpu_supports("popcnt");
#else
    return false;
#endif
}

bool cpu_has_avx2() {
#if defined(ONEBIT_X86) && defined(__GNUC__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
#else
    return false;
#endif
}

const KernelTable* table_for(const std::string& name) {
#if defined(ONEBIT_X86)
    if (name == "avx512") return cpu_has_avx512() ? &kAvx512Table : nullptr;
    if (name == "avx2") return cpu_has_avx2() ? &kAvx2Table : nullptr;
#endif
    if (name == "portable") return &kPortableTable;
    return nullptr;
}

const KernelTable* initial_table() {
    if (const char* env = std::getenv("ONEBIT_KERNEL")) {
        if (const KernelTable* t = table_for(env)) return t;
        // unknown / unsupported / "numpy" (a Python-level path): fall through to the best one
    }
    for (const std::string& name : available_paths())
        if (const KernelTable* t = table_for(name)) return t;
    return &kPortableTable;
}

std::atomic<const KernelTable*>& table_ptr() {
    static std::atomic<const KernelTable*> ptr{initial_table()};
    return ptr;
}

}  // namespace

std::vector<std::string> available_paths() {
    std::vector<std::string> out;
    if (cpu_has_avx512()) out.emplace_back("avx512");
    if (cpu_has_avx2()) out.emplace_back("avx2");
    out.emplace_back("portable");
    return out;
}

const KernelTable& current_table() { return *table_ptr().load(std::memory_order_acquire); }

std::string current_path() { return current_table().name; }

bool set_path(const std::string& name) {
    const KernelTable* t = table_for(name);
    if (!t) return false;
    table_ptr().store(t, std::memory_order_release);
    return true;
}

}  // namespace onebit
