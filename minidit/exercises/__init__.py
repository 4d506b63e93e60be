"""Course tooling: the graded checks of the tutorials and the notebook tools.

    grading      the helpers every check shares (`ExerciseError`, comparing and naming mistakes)
    discrete     checks of tutorials 01-02: ᾱ, q_sample, the posterior, the DDPM loss, the DDPM and DDIM steps
    continuous   checks of 03 and 07: the DSM loss, the Euler-Maruyama step, the flow loss and Euler step
    transformers checks of 04 and 05: attention, patchify, adaLN modulation, classifier-free guidance
    text         checks of 12: cross-attention with a padding mask, MMDiT's joint attention
    fewstep      checks of 13: the consistency function's boundary coefficients, MeanFlow's JVP target
    notebooks    clean notebooks, strip solutions, write the student versions (`minidit exercises`)
    assignments  a notebook as an nbgrader assignment: its exercises, their graded checks, the
                 written questions, and the metadata problems that would make grading unfair

A notebook imports its checks from here: `from minidit.exercises import check_q_sample`. This
subpackage uses minidit's concept modules only.
"""

from minidit.exercises.continuous import (check_dsm_loss, check_euler_flow_step, check_euler_maruyama_step,
                                          check_flow_loss)
from minidit.exercises.discrete import (check_alpha_bar, check_ddim_step, check_ddpm_loss, check_p_sample,
                                        check_posterior, check_q_sample)
from minidit.exercises.fewstep import check_consistency_boundary, check_meanflow_target
from minidit.exercises.grading import ExerciseError
from minidit.exercises.text import check_joint_attention, check_masked_cross_attention
from minidit.exercises.transformers import check_attention, check_cfg, check_modulate, check_patchify

__all__ = ["ExerciseError", "check_alpha_bar", "check_attention", "check_cfg", "check_consistency_boundary",
           "check_ddim_step", "check_ddpm_loss", "check_dsm_loss", "check_euler_flow_step",
           "check_euler_maruyama_step", "check_flow_loss", "check_joint_attention", "check_masked_cross_attention",
           "check_meanflow_target", "check_modulate", "check_p_sample", "check_patchify", "check_posterior",
           "check_q_sample"]
