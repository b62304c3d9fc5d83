/* pyemu: a 32-bit register value that Python and C change concurrently (see shared_word.py). */
#include <stdint.h>

uint32_t pyemu_word_load(const uint32_t *word)
{
    return __atomic_load_n(word, __ATOMIC_SEQ_CST);
}

void pyemu_word_store(uint32_t *word, uint32_t value)
{
    __atomic_store_n(word, value, __ATOMIC_SEQ_CST);
}

uint32_t pyemu_word_set_bits(uint32_t *word, uint32_t bits)
{
    return __atomic_fetch_or(word, bits, __ATOMIC_SEQ_CST);
}

uint32_t pyemu_word_clear_bits(uint32_t *word, uint32_t bits)
{
    return __atomic_fetch_and(word, ~bits, __ATOMIC_SEQ_CST);
}
