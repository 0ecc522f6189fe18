"""Word edges that hold in scripts written without spaces.

Python's ``\\b`` and ``\\w`` count every letter as part of a word, CJK
ideographs, kana, Hangul and Thai included. Those scripts put no space
between words, so a label or a number stands right against its neighbours
('答案是B', '答えはBです', '所以答案是-5'), and ``\\bB\\b`` finds nothing there
(a model that wrote its target exactly had scored 0). Here the letters of
those scripts do not make a word (letters of the others, and digits of any
script, do): a Latin 'B' or a '-' after '是' starts one.
"""

from __future__ import annotations

# Thai, Lao, Tibetan, Myanmar, Khmer; CJK radicals, symbols, kana, Bopomofo,
# ideographs (extension A, the unified block, compatibility and the
# supplementary planes); Hangul syllables (Korean particles attach: '답은
# B입니다'); the full-width and half-width forms but their Latin letters
# ('Ｘ' is an X).
_UNSPACED = ("\u0e00-\u0eff\u0f00-\u0fff\u1000-\u109f\u1780-\u17ff"
             "\u2e80-\u2fdf\u3000-\u30ff\u3100-\u31ff\u3400-\u4dbf"
             "\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uff20"
             "\uff3b-\uff40\uff5b-\uffef\U00020000-\U0003ffff")

# A character that continues a word: `\w`, less the unspaced scripts'
# letters (their digits still join a number: '１２－３' is a range).
WORD_CHAR = rf"(?:[^\W{_UNSPACED}]|\d)"
# Lookarounds for the edges of a word, in place of `\b` before and after it.
START = rf"(?<!{WORD_CHAR})"
END = rf"(?!{WORD_CHAR})"
