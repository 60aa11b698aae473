"""The shared answer extractor, table-driven."""

import pytest

from gazal.answer import HEDGE, NO_ANSWER, NOT_AN_OPTION, OK, answer_statements, extract_answer, is_correct

ABCD = list("ABCD")
ABCDE = list("ABCDE")
A_J = list("ABCDEFGHIJ")
YNM = ["yes", "no", "maybe"]
VITAMINS = {"A": "Vitamin B1", "B": "Vitamin B12", "C": "Folate", "D": "Iron"}
HEPATITIS = {"A": "Hepatitis B", "B": "Hepatitis C", "C": "Hepatitis A", "D": "Hepatitis E"}
CELLS = {"A": "T cells", "B": "NK cells", "C": "B cells", "D": "Macrophages"}
BUGS = {"A": "S. aureus", "B": "E. coli", "C": "K. pneumoniae", "D": "P. aeruginosa", "E": "C. difficile"}
ANTIBIOTICS = {"A": "Ceftriaxone", "B": "Vancomycin", "C": "Metronidazole", "D": "Doxycycline"}

CASES = [
    # (completion, labels, options, label, status)
    ("<think>reasoning</think>\nThe answer is B", ABCD, None, "B", OK),
    ("<think>reasoning</think>The answer is (C).", ABCD, None, "C", OK),
    ("<think>x</think>\n**Answer:** D", ABCD, None, "D", OK),
    ("<think>x</think>\nFinal answer: A", ABCD, None, "A", OK),
    ("<think>x</think>\n\\boxed{B}", ABCD, None, "B", OK),
    ("<think>x</think>\nB", ABCD, None, "B", OK),
    ("<think>x</think>\n(D)", ABCD, None, "D", OK),
    ("The correct answer is C.", ABCD, None, "C", OK),
    ("Answer: E", ABCDE, None, "E", OK),
    ("The answer is J", A_J, None, "J", OK),
    ("The answer is I", A_J, None, "I", OK),
    ("The answer is I think B", ABCD, None, "B", OK),
    # reasoning is not read once it is closed
    ("<think>The answer is A</think>\nThe answer is C", ABCD, None, "C", OK),
    ("<think>The answer is A</think>\n", ABCD, None, None, NO_ANSWER),
    # truncated: an unclosed <think> means no answer, even if it mentions one
    ("<think>The answer is B, because", ABCD, None, None, NO_ANSWER),
    ("", ABCD, None, None, NO_ANSWER),
    ("I am not sure.", ABCD, None, None, NO_ANSWER),
    # revised answers: the last explicit statement wins
    ("The answer is A. On reflection, the answer is D.", ABCD, None, "D", OK),
    ("<think>x</think>\nAnswer: B\nWait. Final answer: C", ABCD, None, "C", OK),
    # explicit statement beats letters merely mentioned
    ("<think>x</think>\nOption A is tempting and D is possible.\nThe answer is B", ABCD, None, "B", OK),
    # hedges
    ("The answer is B or C", ABCD, None, None, HEDGE),
    ("The answer is A, B, C, D", ABCD, None, None, HEDGE),
    ("The answer is B and C", ABCD, None, None, HEDGE),
    ("Answer: (B)/(C)", ABCD, None, None, HEDGE),
    ("The answer is yes or no", YNM, None, None, HEDGE),
    # not an option
    ("The answer is E", ABCD, None, None, NOT_AN_OPTION),
    ("Answer: F", ABCDE, None, None, NOT_AN_OPTION),
    ("<think>x</think>\nK", A_J, None, None, NOT_AN_OPTION),
    # option text maps to its letter, longest exact match first
    ("Answer: Vitamin B12", ABCD, VITAMINS, "B", OK),
    ("The answer is Vitamin B1.", ABCD, VITAMINS, "A", OK),
    ("The answer is folate", ABCD, VITAMINS, "C", OK),
    ("The answer is C (Hepatitis A)", ABCD, HEPATITIS, "C", OK),
    ("The answer is Hepatitis A", ABCD, HEPATITIS, "C", OK),
    ("The answer is Iron or Folate", ABCD, VITAMINS, None, HEDGE),
    ("<think>x</think>\nFolate deficiency explains it.", ABCD, VITAMINS, "C", OK),
    # yes / no / maybe
    ("<think>x</think>\nThe answer is yes", YNM, None, "yes", OK),
    ("<think>x</think>\nThe answer is no.", YNM, None, "no", OK),
    ("<think>x</think>\nAnswer: Maybe", YNM, None, "maybe", OK),
    ("The answer is yes, because there is no bias", YNM, None, "yes", OK),
    ("<think>x</think>\nno", YNM, None, "no", OK),
    ("<think>the answer is yes</think>", YNM, None, None, NO_ANSWER),
    ("The answer is not clear", YNM, None, None, NO_ANSWER),
    ("<think>maybe</think>\nThe answer is no", YNM, None, "no", OK),
    ("<think>x</think>\nAnswer: MAYBE.", YNM, None, "maybe", OK),
    ("<think>x</think>\nThe answer is perhaps", YNM, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is yes. Wait, the final answer is maybe", YNM, None, "maybe", OK),
    ("<think>x</think>\nyes or maybe", YNM, None, None, HEDGE),
    # five options (A-E)
    ("<think>x</think>\nThe answer is E", ABCDE, None, "E", OK),
    ("<think>x</think>\nThe answer is (E) Nephrotic syndrome", ABCDE, None, "E", OK),
    ("<think>x</think>\nThe answer is F", ABCDE, None, None, NOT_AN_OPTION),
    ("<think>x</think>\nThe answer is D or E", ABCDE, None, None, HEDGE),
    ("<think>x</think>\nThe best answer is: **E**", ABCDE, None, "E", OK),
    ("<think>x</think>\n**E.**", ABCDE, None, "E", OK),
    # ten options (A-J)
    ("<think>x</think>\nThe answer is (H).", A_J, None, "H", OK),
    ("<think>x</think>\nThe answer is G, H", A_J, None, None, HEDGE),
    ("<think>x</think>\nAnswer: J", A_J, None, "J", OK),
    ("<think>x</think>\n\\boxed{F}", A_J, None, "F", OK),
    ("<think>x</think>\nThe answer is A because the rash is vesicular", ABCD, None, "A", OK),
    ("<think>x</think>\nI think it is probably C", ABCD, None, "C", OK),
    # answers only inside the reasoning earn nothing
    ("<think>B is right. The answer is B.</think>\nI hope this helps.", ABCD, None, None, NO_ANSWER),
    ("<think>Answer: yes</think>\nThank you.", YNM, None, None, NO_ANSWER),
    # truncated output
    ("<think>1. Findings: fever. 2. Differential: pneumonia vs", ABCDE, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is", ABCD, None, None, NO_ANSWER),
    # a second, conflicting answer after the first: the last one counts
    ("<think>x</think>\nThe answer is B.\nThe answer is C.", ABCD, None, "C", OK),
    # option text with markup, and text that does not match any option
    ("<think>x</think>\nThe answer is **Vitamin B12**.", ABCD, VITAMINS, "B", OK),
    ("<think>x</think>\nThe answer is vitamin C", ABCD, VITAMINS, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is Hepatitis E or Hepatitis A", ABCD, HEPATITIS, None, HEDGE),
    # rule 6: a bare capital opening prose is a pronoun or article, even when it is a label (A-J)
    ("<think>x</think>\nAnswer: I would go with B.", A_J, None, "B", OK),
    ("<think>x</think>\nI would go with B.", A_J, None, "B", OK),
    ("<think>x</think>\nThe answer is I think B", A_J, None, "B", OK),
    ("<think>x</think>\nAnswer: I think it is C", A_J, None, "C", OK),
    ("<think>x</think>\nI'd pick D.", A_J, None, "D", OK),
    ("<think>x</think>\nAnswer: I'm not sure.", A_J, None, None, NO_ANSWER),
    ("<think>x</think>\nI am not sure.", A_J, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is A patient with nephrotic syndrome", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is A diagnosis of exclusion", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nAnswer: A beta blocker", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is B cells", ABCD, CELLS, "C", OK),
    ("<think>x</think>\nThe answer is E. coli", ABCDE, BUGS, "B", OK),
    ("<think>x</think>\nThe answer is C. difficile colitis", ABCDE, BUGS, "E", OK),
    ("<think>x</think>\nThe answer is E. coli", ABCDE, None, None, NO_ANSWER),
    # ... but a letter that is punctuated, bracketed or explained stays a letter
    ("<think>x</think>\nAnswer: I", A_J, None, "I", OK),
    ("<think>x</think>\nThe answer is I.", A_J, None, "I", OK),
    ("<think>x</think>\nAnswer: I. Nephrotic syndrome", A_J, None, "I", OK),
    ("<think>x</think>\nAnswer: I) Nephrotic syndrome", A_J, None, "I", OK),
    ("<think>x</think>\nThe answer is (I) nephrotic syndrome", A_J, None, "I", OK),
    ("<think>x</think>\nThe answer is I because the rash is vesicular", A_J, None, "I", OK),
    ("<think>x</think>\nThe answer is A. Nephrotic syndrome", ABCD, None, "A", OK),
    ("<think>x</think>\nThe answer is A, since the rash is vesicular", ABCD, None, "A", OK),
    ("<think>x</think>\nThe answer is C is correct", ABCD, None, "C", OK),
    # "Option B" / "Choice C" alone is a statement of the letter
    ("<think>x</think>\nOption B", ABCD, None, "B", OK),
    ("<think>x</think>\nOption B.", ABCD, None, "B", OK),
    ("<think>x</think>\nChoice C", ABCD, None, "C", OK),
    ("<think>x</think>\nOption (B)", ABCD, None, "B", OK),
    ("<think>x</think>\n**Option B**", ABCD, None, "B", OK),
    ("<think>x</think>\nAnswer: Option D", ABCD, None, "D", OK),
    ("<think>x</think>\nThe answer is option D.", ABCD, None, "D", OK),
    ("<think>x</think>\nThe answer is C.\nOption B", ABCD, None, "B", OK),
    ("<think>x</think>\nOption A is tempting, but the answer is B", ABCD, None, "B", OK),
    ("<think>x</think>\nAnswer: Option B or C", ABCD, None, None, HEDGE),
    ("<think>x</think>\nOption F", ABCDE, None, None, NOT_AN_OPTION),
    ("<think>x</think>\nThe best option is a biopsy.", ABCD, None, None, NO_ANSWER),
    # rule 7: lowercase letters in forms prose never uses map to the capital labels
    ("<think>x</think>\nThe answer is (b).", ABCD, None, "B", OK),
    ("<think>x</think>\nanswer: c", ABCD, None, "C", OK),
    ("<think>x</think>\nThe answer is b.", ABCD, None, "B", OK),
    ("<think>x</think>\nThe answer is a.", ABCD, None, "A", OK),
    ("<think>x</think>\nThe answer is **d**", ABCD, None, "D", OK),
    ("<think>x</think>\nThe answer is [c]", ABCD, None, "C", OK),
    ("<think>x</think>\nThe answer is b) nephrotic syndrome", ABCD, None, "B", OK),
    ("<think>x</think>\nThe answer is option c", ABCD, None, "C", OK),
    ("<think>x</think>\nI would go with b.", ABCD, None, "B", OK),
    ("<think>x</think>\n(b)", ABCD, None, "B", OK),
    ("<think>x</think>\nb", ABCD, None, "B", OK),
    ("<think>x</think>\nThe answer is (b) or (c)", ABCD, None, None, HEDGE),
    ("<think>x</think>\nThe answer is b or c", ABCD, None, None, HEDGE),
    ("<think>x</think>\nThe answer is (f).", ABCDE, None, None, NOT_AN_OPTION),
    # ... and a lowercase letter in prose is not a label
    ("<think>x</think>\nThe answer is a beta blocker", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is a deficiency of vitamin c.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is hepatitis b.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is hepatitis b", ABCD, HEPATITIS, "A", OK),
    ("<think>x</think>\nThe answer is vitamin C", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is hepatitis B", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is e.g. a beta blocker", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is i.e. folate", ABCD, VITAMINS, "C", OK),
    # issue 25: a second option offered as possible is a hedge, however it is worded (rule 5)
    ("<think>x</think>\nThe answer is C, or maybe A.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nAnswer: B, perhaps D", ABCD, None, None, HEDGE),
    ("<think>x</think>\nAnswer: A (or possibly C)", ABCD, None, None, HEDGE),
    ("<think>x</think>\nD, although B is also possible.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nThe answer is A; C can't be ruled out.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nAnswer: B (D is a close alternative)", ABCD, None, None, HEDGE),
    ("<think>x</think>\nI'd go with B, though I wouldn't rule out C.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nIt is either A or D.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nAnswer: C/D", ABCD, None, None, HEDGE),
    ("<think>x</think>\n**Answer: (C) or (D)**", ABCD, None, None, HEDGE),
    ("<think>x</think>\nProbably A, but C might also be right.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nAnswer: E, with F as a close second", A_J, None, None, HEDGE),
    ("<think>x</think>\nThe answer is (G), or perhaps (H).", A_J, None, None, HEDGE),
    ("<think>x</think>\nThe answer is ceftriaxone or vancomycin.", ABCD, ANTIBIOTICS, None, HEDGE),
    ("<think>x</think>\nAnswer: no, or possibly maybe", YNM, None, None, HEDGE),
    ("<think>x</think>\nAnswer: maybe, though yes is also reasonable.", YNM, None, None, HEDGE),
    ("<think>x</think>\nThe answer is either yes or maybe.", YNM, None, None, HEDGE),
    ("<think>x</think>\nyes/maybe", YNM, None, None, HEDGE),
    # ... but a label set aside is no offer (rule 4), and neither is one named in the explanation
    ("<think>x</think>\nAnswer: D, not A", ABCD, None, "D", OK),
    ("<think>x</think>\nThe answer should be B rather than C.", ABCD, None, "B", OK),
    ("<think>x</think>\nI'd pick C over D.", ABCD, None, "C", OK),
    ("<think>x</think>\nC is wrong; the answer is A.", ABCD, None, "A", OK),
    ("<think>x</think>\nAnswer: not C but A", ABCD, None, "A", OK),
    ("<think>x</think>\nNot A, B, or C, so D.", ABCD, None, "D", OK),
    ("<think>x</think>\nFinal answer: A (not B, C or D)", ABCD, None, "A", OK),
    ("<think>x</think>\nThe correct answer is B, A is incorrect, D is incorrect.", ABCD, None, "B", OK),
    ("<think>x</think>\nB and C are wrong; A is correct.", ABCD, None, "A", OK),
    ("<think>x</think>\nThe answer is C, since A and B would drop the pressure further.", ABCD, None, "C", OK),
    ("<think>x</think>\nThe answer is B. A or C would be reasonable if she were stable.", ABCD, None, "B", OK),
    ("<think>x</think>\nThe answer is A; D would be correct if she were pregnant.", ABCD, None, "A", OK),
    ("<think>x</think>\nAnswer: C. Hepatitis B is also possible but less likely.", ABCD, None, "C", OK),
    ("<think>x</think>\nThe answer is H, not I.", A_J, None, "H", OK),
    ("<think>x</think>\nAnswer: yes, not maybe", YNM, None, "yes", OK),
    ("<think>x</think>\nThe answer is not no; it is yes.", YNM, None, "yes", OK),
    ("<think>x</think>\nAnswer: ceftriaxone, not vancomycin", ABCD, ANTIBIOTICS, "A", OK),
    ("<think>x</think>\nNot D.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is not B.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nD is incorrect.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nA is a distractor here.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nI don't think it's C.", ABCD, None, None, NO_ANSWER),
    # verdicts and first-person answers (rule 2)
    ("<think>x</think>\nI think D is the correct answer.", ABCD, None, "D", OK),
    ("<think>x</think>\nI believe that A is correct.", ABCD, None, "A", OK),
    ("<think>x</think>\nI'm fairly confident (C) is right.", ABCD, None, "C", OK),
    ("<think>x</think>\nOption c is the most appropriate.", ABCD, None, "C", OK),
    ("<think>x</think>\n**B** is the best answer.", ABCD, None, "B", OK),
    ("<think>x</think>\n[B] is the correct answer.", ABCD, None, "B", OK),
    ("<think>x</think>\nC is the right option because the murmur is diastolic.", ABCD, None, "C", OK),
    ("<think>x</think>\nI think I is correct.", A_J, None, "I", OK),
    ("<think>x</think>\nThe answer is D. B is the best choice, though C is also possible.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nMy answer: C", ABCD, None, "C", OK),
    ("<think>x</think>\nI'm confident the answer is C", ABCD, None, "C", OK),
    ("<think>x</think>\nIt's B.", ABCD, None, "B", OK),
    ("<think>x</think>\nThat makes C the answer.", ABCD, None, "C", OK),
    ("<think>x</think>\nD it is.", ABCD, None, "D", OK),
    ("<think>x</think>\nLeaning towards C.", ABCD, None, "C", OK),
    ("<think>x</think>\nI'll choose c.", ABCD, None, "C", OK),
    ("<think>x</think>\nHence [C].", ABCD, None, "C", OK),
    ("<think>x</think>\nThe correct drug here is vancomycin.", ABCD, ANTIBIOTICS, "B", OK),
    ("<think>x</think>\nI think yes is right.", YNM, None, "yes", OK),
    ("<think>x</think>\nI was right about the murmur.", A_J, None, None, NO_ANSWER),
    ("<think>x</think>\nInitially I thought A was correct, but on review it is D.", ABCD, None, "D", OK),
    # answer markers: dashes, bold, LaTeX
    ("<think>x</think>\nAnswer — C", ABCD, None, "C", OK),
    ("<think>x</think>\nAnswer – B", ABCD, None, "B", OK),
    ("<think>x</think>\n**Answer: (C)**", ABCD, None, "C", OK),
    ("<think>x</think>\nFinal answer: \\boxed{C}", ABCD, None, "C", OK),
    ("<think>x</think>\n$\\boxed{\\textbf{D}}$", ABCD, None, "D", OK),
    ("<think>x</think>\nFinal answer: \\boxed{\\text{(A)}}", ABCD, None, "A", OK),
    ("<think>x</think>\n\\(\\boxed{\\mathrm{H}}\\)", A_J, None, "H", OK),
    ("<think>x</think>\n$\\boxed{\\text{no}}$", YNM, None, "no", OK),
    # prose capitals stay prose (rule 7)
    ("<think>x</think>\nA 30-year-old man needs an ECG.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nD-dimer should be measured first.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe answer is C-peptide.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nA CT scan is indicated.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nI was unable to decide.", A_J, None, None, NO_ANSWER),
    ("<think>x</think>\nVitamin D is the most likely deficiency.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nA fever of 38 °C is common.", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nThe temperature was 37.8 °C or higher.", ABCD, None, None, NO_ANSWER),
    # issue 25, after a blind held-out set (written without the rules) found these forms; phrased anew here
    ("<think>x</think>\nThe right answer isn't C but B.", ABCD, None, "B", OK),
    ("<think>x</think>\nMany residents would say A; the answer is actually D.", ABCD, None, "D", OK),
    ("<think>x</think>\nBoth B and C seem defensible to me.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nEither A or D would fit this picture.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nIt could be B or D depending on the echo.", ABCD, None, None, HEDGE),
    ("<think>x</think>\n$\\boxed{B}$ / $\\boxed{C}$", ABCD, None, None, HEDGE),
    ("<think>x</think>\nThe answer is A. That said, it might equally be C.", ABCD, None, None, HEDGE),
    ("<think>x</think>\nBetween B and D, I would pick D.", ABCD, None, "D", OK),
    ("<think>x</think>\nWeighing everything, I would keep B as my final choice.", ABCD, None, "B", OK),
    ("<think>x</think>\nThe imaging findings make (C) the most likely answer.", ABCD, None, "C", OK),
    ("<think>x</think>\nA review of all four leaves C as the answer.", ABCD, None, "C", OK),
    ("<think>x</think>\n### Verdict\n**D** Aortic dissection\n\nB is less likely.", ABCD, None, "D", OK),
    ("<think>x</think>\n**B — Acute cholecystitis**\n\nThe fever and Murphy sign fit; pancreatitis (A) would raise "
     "lipase, and (D) needs free air.", ABCD, None, "B", OK),
    ("<think>x</think>\nOptions:\nA. Aspirin\nB. Heparin\nC. Alteplase\nD. Clopidogrel", ABCD, None, None, NO_ANSWER),
    ("<think>x</think>\nE. coli is the usual cause, so the answer is B.", ABCD, None, "B", OK),
    ("<think>x</think>\nNo, leaning maybe.", YNM, None, None, HEDGE),
    ("<think>x</think>\nYes, or at most maybe.", YNM, None, None, HEDGE),
    ("<think>x</think>\nmaybe yes no", YNM, None, None, HEDGE),
    ("<think>x</think>\n**Answer:** A, though C is equally plausible if the culture grows gram-negatives.", ABCD, None,
     None, HEDGE),
    ("<think>x</think>\nThe low ferritin makes it B, not A.", ABCD, None, "B", OK),
    ("<think>x</think>\n### Answer\nB\n\n### Revised answer\n**D. Haloperidol**", ABCD, None, "D", OK),
    ("<think>x</think>\n**C. t(15;17)**\n\nPML-RARA defines acute promyelocytic leukemia.", ABCD, None, "C", OK),
    ("<think>x</think>\nThe answer is (B).\n\n(A) Lithium would not cause this.", ABCD, None, "B", OK),
    ("<think>x</think>\nA) Aspirin B) Heparin C) Alteplase D) Warfarin", ABCD, None, None, NO_ANSWER),
]


@pytest.mark.parametrize("completion,labels,options,label,status", CASES)
def test_extract(completion, labels, options, label, status):
    got = extract_answer(completion, labels, options)
    assert (got.label, got.status) == (label, status)


@pytest.mark.parametrize("answer_text,label", [("\nOption B\n", "B"), ("\n**Choice (c)**\n", "C"), ("\nb\n", "B")])
def test_option_line_is_one_answer_statement(answer_text, label):
    # The format reward counts statements: "Option B" alone is one, like a line holding only "B".
    [statement] = answer_statements(answer_text, ABCD)
    assert (statement.extraction.label, statement.extraction.status) == (label, OK)


@pytest.mark.parametrize("answer_text,label,status", [
    ("\nC is the correct answer.\n", "C", OK),
    ("\nI believe option b is the best choice.\n", "B", OK),
    ("\nB is the correct answer, though D is also possible.\n", None, HEDGE),
])
def test_verdict_is_one_answer_statement(answer_text, label, status):
    # "correct answer" inside a verdict is not a second, empty statement: the format reward sees one.
    [statement] = answer_statements(answer_text, ABCD)
    assert (statement.extraction.label, statement.extraction.status) == (label, status)


def test_only_clean_answers_earn_credit():
    assert is_correct(extract_answer("The answer is B", ABCD), "B")
    assert not is_correct(extract_answer("The answer is B or C", ABCD), "B")
    assert not is_correct(extract_answer("The answer is C", ABCD), "B")
    assert is_correct(extract_answer("The answer is Yes", YNM), "yes")
    assert not is_correct(extract_answer("The answer is A, or perhaps C.", ABCD), "A")
