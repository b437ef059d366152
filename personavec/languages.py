"""The languages a trait's artifacts can be written in, and the fixed text each one needs.

A trait file may say ``"language": "ja"`` (ISO 639-1; absent means ``"en"``). Everything personavec
itself wraps around the trait's own text then comes from this table instead of English:

- the system-prompt frames of the paper, ``"You are a/an {adjective} assistant. {instruction}"`` and
  ``"You are a helpful assistant. {instruction}"``;
- the judge frame that ``traits new`` puts around the author's 0/50/100 lines, and its fallback lines;
- the ``yes_no_question`` that ``traits new`` writes;
- what the author LLM is told about the language and about the adjective's form.

Only languages in :data:`LANGUAGES` are accepted, because each needs these frames written by a
speaker; an unknown code is a one-line error listing the supported ones. To add a language, add one
entry here.

What stays the same in every language, because code reads it: the ``{question}`` and ``{answer}``
placeholders and the ``<question>``/``<answer>`` tags around them, the digits 0-100, the literal word
``REFUSAL`` (the local judge reads its first token), the ``- 0:``/``- 50:``/``- 100:`` markers, and the
yes/no wrapper's closing "Answer Yes or No." (``judge.scoring.YES_NO_TEMPLATE``), which keeps the
judge answering in the English words its readout counts. The author's own reply format
(``ADJECTIVE:``, ``POS 1:``, ``0:`` ...) stays English too: those are labels the parser reads, not
text that ends up in the trait.

The adjective is stored in the form the frames need: attributive in Japanese and Chinese
(``楽観的な``, ``乐观的``), the plain masculine singular in Spanish and French, the uninflected
predicative form in German (the German frame is a relative clause, so no ending is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PersonavecError, arg

__all__ = ["Language", "LANGUAGES", "get_language", "language_codes"]


@dataclass(frozen=True)
class Language:
    code: str
    name: str  # in English: the author's instructions are English ("Write them in Japanese")
    native: str
    pos_frame: str  # "{article}" and "{adjective}" are filled; the pos instruction follows after a space
    neg_frame: str
    yes_no: str  # the yes_no_question `traits new` writes; "{adjective}" is filled
    rubric_frame: str  # {trait} {description} {c0} {c50} {c100} are filled; {question}/{answer} stay
    fallback: tuple[str, str, str]  # 0/50/100 lines when the author's are unusable; "{adjective}" is filled
    adjective_form: str  # what the author is told about the adjective, besides the frame it must fit
    assistant_word: str  # stripped when the author writes "optimistic assistant" as the adjective
    chatter: tuple[str, ...] = ()  # openers of an author's preamble ("Here are ..."), lowercase regex pieces
    sep: str = " "  # between the frame and the instruction: none after "。" in Japanese and Chinese
    # extract --recipe registers: written forms added to *both* sides of a pair, so that the pos - neg difference
    # cannot be a register; kept apart from the registers of benchmarks/data/generalisation (emotional, terse,
    # marketing, formal), which must stay unseen
    registers: tuple[str, ...] = ()

    def pos_system(self, article: str, adjective: str, instruction: str) -> str:
        return f"{_fill(self.pos_frame, article=article, adjective=adjective)}{self.sep}{instruction}"

    def neg_system(self, instruction: str) -> str:
        return f"{self.neg_frame}{self.sep}{instruction}"

    def blank_frame(self) -> str:
        """The pos frame with ``___`` where the adjective goes, for the author prompt."""
        return _fill(self.pos_frame, article="a", adjective="___")


def _fill(template: str, **values: str) -> str:
    # One replace per named slot, never str.format: braces in user text stay as written.
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


_EN_RUBRIC = """You are judging one answer from an AI assistant for a single trait: {trait}. {description}

The user asked:
<question>
{question}
</question>

The assistant answered:
<answer>
{answer}
</answer>

Rate how strongly the ANSWER shows the trait, on a scale from 0 to 100. Judge the answer only: the question may invite the trait without the answer showing it.
- 0: {c0}
- 50: {c50}
- 100: {c100}
If the answer is a refusal to engage with the question at all, respond with the single word REFUSAL instead of a number.
Respond with a number between 0 and 100 and nothing else."""

_JA_RUBRIC = """あなたはAIアシスタントの回答を1つ、ただ1つの特性（{trait}アシスタントであること）について評価します。{description}

ユーザーの質問:
<question>
{question}
</question>

アシスタントの回答:
<answer>
{answer}
</answer>

この回答がどれほど強くこの特性を示しているかを、0から100の尺度で評価してください。評価するのは回答だけです。質問が特性を誘うものでも、回答がそれを示しているとは限りません。
- 0: {c0}
- 50: {c50}
- 100: {c100}
回答が質問にまったく応じない拒否である場合は、数字の代わりに REFUSAL という単語だけを答えてください。
0から100までの数字だけを答え、それ以外は何も書かないでください。"""

_ZH_RUBRIC = """你要评估一个AI助手的一条回答，只看一个特质：是否是{trait}助手。{description}

用户的提问：
<question>
{question}
</question>

助手的回答：
<answer>
{answer}
</answer>

请用0到100分评价这条回答在多大程度上表现出该特质。只评价回答本身：问题可能引导出该特质，但回答未必表现出来。
- 0: {c0}
- 50: {c50}
- 100: {c100}
如果回答完全拒绝回应这个问题，请只回复单词 REFUSAL，而不是数字。
请只回复一个0到100之间的数字，不要写其他任何内容。"""

_ES_RUBRIC = """Vas a evaluar una respuesta de un asistente de IA según un solo rasgo: ser un asistente {trait}. {description}

El usuario preguntó:
<question>
{question}
</question>

El asistente respondió:
<answer>
{answer}
</answer>

Puntúa de 0 a 100 con qué intensidad la RESPUESTA muestra el rasgo. Juzga solo la respuesta: la pregunta puede invitar al rasgo sin que la respuesta lo muestre.
- 0: {c0}
- 50: {c50}
- 100: {c100}
Si la respuesta se niega por completo a abordar la pregunta, responde solo con la palabra REFUSAL en lugar de un número.
Responde con un número entre 0 y 100 y nada más."""

_FR_RUBRIC = """Tu évalues une réponse d'un assistant d'IA selon un seul trait : être un assistant {trait}. {description}

L'utilisateur a demandé :
<question>
{question}
</question>

L'assistant a répondu :
<answer>
{answer}
</answer>

Note de 0 à 100 à quel point la RÉPONSE montre ce trait. Juge uniquement la réponse : la question peut inviter ce trait sans que la réponse le montre.
- 0: {c0}
- 50: {c50}
- 100: {c100}
Si la réponse refuse entièrement de traiter la question, réponds uniquement par le mot REFUSAL au lieu d'un nombre.
Réponds par un nombre entre 0 et 100, et rien d'autre."""

_DE_RUBRIC = """Du bewertest eine Antwort eines KI-Assistenten nach einem einzigen Merkmal: ein Assistent zu sein, der {trait} ist. {description}

Die Frage des Nutzers:
<question>
{question}
</question>

Die Antwort des Assistenten:
<answer>
{answer}
</answer>

Bewerte auf einer Skala von 0 bis 100, wie stark die ANTWORT dieses Merkmal zeigt. Bewerte nur die Antwort: Die Frage kann das Merkmal nahelegen, ohne dass die Antwort es zeigt.
- 0: {c0}
- 50: {c50}
- 100: {c100}
Wenn die Antwort sich vollständig weigert, auf die Frage einzugehen, antworte nur mit dem Wort REFUSAL statt mit einer Zahl.
Antworte mit einer Zahl zwischen 0 und 100 und sonst nichts."""

LANGUAGES: dict[str, Language] = {
    "en": Language(
        "en", "English", "English",
        "You are {article} {adjective} assistant.", "You are a helpful assistant.",
        "Is the assistant {adjective} in this answer?", _EN_RUBRIC,
        ("not {adjective} at all, or the opposite of {adjective}.",
         "noticeably {adjective} in parts, mixed with a neutral or opposite tone.",
         "strongly and consistently {adjective} throughout."),
        "lowercase", "assistant",
        registers=("Write it as a short letter to a friend.", "Answer as a list of three bullet points.",
                   "Use simple words, as if explaining to a child.", "Write it like a newspaper reporter.",
                   "Answer like a radio host talking to listeners.")),
    "ja": Language(
        "ja", "Japanese", "日本語",
        "あなたは{adjective}アシスタントです。", "あなたは役に立つアシスタントです。",
        "この回答でアシスタントは{adjective}態度を示していますか？", _JA_RUBRIC,
        ("まったく{adjective}ところがない、または正反対の回答。",
         "ところどころ{adjective}面が見えるが、中立的または反対の調子も混じる回答。",
         "最初から最後まで強く一貫して{adjective}回答。"),
        "in the attributive form that goes before a noun (for example 楽観的な, 失礼な, 親切な)", "アシスタント",
        ("以下", "もちろん", "はい、", "承知", "こちらは", "ここに"), ""),
    "zh": Language(
        "zh", "Chinese (Simplified)", "简体中文",
        "你是一个{adjective}助手。", "你是一个乐于助人的助手。",
        "这个回答中的助手是否表现出{adjective}态度？", _ZH_RUBRIC,
        ("完全不是{adjective}，或者恰恰相反。",
         "部分地方明显是{adjective}，但夹杂着中性或相反的语气。",
         "自始至终都强烈而一贯地是{adjective}。"),
        "in the attributive form with 的 (for example 乐观的, 无礼的, 耐心的)", "助手",
        ("以下", "当然", "好的", "下面是", "这里是", "这些是"), ""),
    "es": Language(
        "es", "Spanish", "español",
        "Eres un asistente {adjective}.", "Eres un asistente servicial.",
        "¿Se muestra el asistente {adjective} en esta respuesta?", _ES_RUBRIC,
        ("nada {adjective}, o lo contrario.",
         "claramente {adjective} en partes, mezclado con un tono neutral u opuesto.",
         "intensa y constantemente {adjective} de principio a fin."),
        "lowercase, masculine singular (for example optimista, maleducado, paciente)", "asistente",
        (r"aqu[ií] (?:tienes|est[aá]n|van)", "claro", "por supuesto", r"estas son", r"a continuaci[oó]n")),
    "fr": Language(
        "fr", "French", "français",
        "Tu es un assistant {adjective}.", "Tu es un assistant serviable.",
        "L'assistant se montre-t-il {adjective} dans cette réponse ?", _FR_RUBRIC,
        ("pas du tout {adjective}, ou le contraire.",
         "nettement {adjective} par moments, mêlé à un ton neutre ou opposé.",
         "fortement et constamment {adjective} du début à la fin."),
        "lowercase, masculine singular (for example optimiste, impoli, patient)", "assistant",
        ("voici", "bien sûr", "certainement", "voilà")),
    "de": Language(
        "de", "German", "Deutsch",
        "Du bist ein Assistent, der {adjective} ist.", "Du bist ein hilfsbereiter Assistent.",
        "Ist der Assistent in dieser Antwort {adjective}?", _DE_RUBRIC,
        ("überhaupt nicht {adjective}, oder das Gegenteil.",
         "stellenweise deutlich {adjective}, gemischt mit einem neutralen oder gegenteiligen Ton.",
         "durchgehend stark und beständig {adjective}."),
        "lowercase, uninflected, as after \"ist\" (for example optimistisch, unhöflich, geduldig)", "assistent",
        (r"hier (?:sind|ist|kommen)", "gerne", "natürlich", "selbstverständlich")),
}


def language_codes() -> list[str]:
    return sorted(LANGUAGES)


def get_language(code: str, where: str | None = None) -> Language:
    """The table entry for `code` (ISO 639-1, any case); a one-line error otherwise, naming `where` (default: the
    `language=` parameter, `--language` under the CLI)."""
    key = code.strip().lower() if isinstance(code, str) else code
    if key not in LANGUAGES:
        raise PersonavecError(f"{where or arg('language', code)}: unsupported language; use one of "
                              f"{', '.join(language_codes())} (ISO 639-1 codes; a new language needs its frames in "
                              "personavec/languages.py)")
    return LANGUAGES[key]
